"""The pool of pipelined senders that turn client messages into NOTIFYs."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any

import psycopg
import structlog

from pgws.config import Config
from pgws.db.connect import (
    CONNECT_TIMEOUT,
    Backoff,
    connection_kwargs,
    db_target,
    describe,
    sever,
    severed_after,
    with_retries,
)
from pgws.db.pipeline import Message, PipelinedConnection
from pgws.errors import NotifyFailed

log = structlog.get_logger("pgws.db.notifier")

NOTIFY = "SELECT pg_notify($1, $2)"
# How long a NOTIFY may take from notify() to the database's answer (a retry included) before its
# client is told the database is unavailable; a connection that keeps it waiting is presumed dead.
NOTIFY_TIMEOUT = 5.0  # At most this many NOTIFYs go out in one batch on one connection.
BATCH_MAX = 256
# How long close() lets the senders finish what is queued before it fails the rest.
CLOSE_GRACE = 1.0
UNAVAILABLE = "database unavailable: the message was not sent"
_STOPPING = "server stopping: the message may not have been sent"


@dataclasses.dataclass(frozen=True, slots=True)
class NotifierStats:
    """The senders' counters at one moment (Notifier.stats())."""

    sent: int  # NOTIFYs the database accepted
    failed: int  # notify() calls that raised NotifyFailed
    resent: int  # NOTIFYs sent again on a fresh connection after theirs died
    queue_usage: float | None  # the last pg_notification_queue_usage(); None while unknown
    in_flight: int  # NOTIFYs sent whose answer has not come back yet (not a metric)


class Notifier:
    """Sends envelopes with `pg_notify(listen_channel, payload)` through a few pipelined senders.

    notify() queues the payload with a future and waits for it. PGWS_POOL_SIZE sender tasks each
    own one connection: a sender takes everything queued (up to BATCH_MAX), sends it in pipeline
    mode with a Sync after every NOTIFY, and settles each future with its own outcome. So:

    - every NOTIFY is its own transaction: identical payloads are all delivered, and a payload the
      database refuses fails only its own waiter;
    - a waiter is answered within about NOTIFY_TIMEOUT whatever the database does (at once when
      it refuses connections);
    - a connection that dies costs no message: whatever was unanswered on it is sent once more on
      a fresh connection. Delivery is at least once: a NOTIFY committed just before its connection
      died, its answer lost, is sent twice;
    - a caller that awaits each notify() before the next (every socket does) has its messages
      delivered in order: a retry happens before notify() returns.
    """

    def __init__(self, config: Config) -> None:
        self._channel = config.listen_channel.encode()
        self._size = config.pool_size
        self._retries = config.retries
        self._conninfo = config.db_uri
        self._connect_kwargs: dict[str, Any] = {
            "autocommit": True,
            **connection_kwargs(config.db_uri, "pgws-notify"),
        }
        self._queue: asyncio.Queue[Message] = asyncio.Queue()
        self._connections: list[PipelinedConnection | None] = [None] * self._size
        self._lifetime = contextlib.AsyncExitStack()  # holds the senders' task group while open
        self._senders: list[asyncio.Task[None]] = []
        self._closing = False
        # Live counters, written only here (tests read them); /metrics reads stats().
        self.sent = 0
        self.failed = 0
        self.resent = 0
        self.queue_usage: float | None = None

    def stats(self) -> NotifierStats:
        """A snapshot of the counters, for /metrics."""
        return NotifierStats(
            sent=self.sent,
            failed=self.failed,
            resent=self.resent,
            queue_usage=self.queue_usage,
            in_flight=sum(conn.unanswered for conn in self._connections if conn is not None),
        )

    async def open(self) -> None:
        """Open the senders' connections (with the start-up retries), then start the senders."""

        async def attempt() -> list[PipelinedConnection | None]:
            results = await asyncio.gather(
                *(self._connect(CONNECT_TIMEOUT) for _ in range(self._size)),
                return_exceptions=True,
            )
            opened = [conn for conn in results if isinstance(conn, PipelinedConnection)]
            failed = [exc for exc in results if not isinstance(exc, PipelinedConnection)]
            if failed:
                for conn in opened:
                    await conn.close()
                raise failed[0]
            return list(opened)

        self._connections = await with_retries(
            "notifier", self._retries, attempt, where=db_target(self._conninfo)
        )
        # The senders' own task group, entered here and left by close() (the same task must call
        # both): they outlive the gateway's supervised tasks, to send what closing sockets wrote.
        senders = await self._lifetime.enter_async_context(asyncio.TaskGroup())
        self._senders = [
            senders.create_task(self._send_forever(slot), name=f"notify-sender-{slot}")
            for slot in range(self._size)
        ]

    async def notify(self, payload: str) -> None:
        """NOTIFY one payload; raise NotifyFailed (with a reason for the client) if it was not."""
        if self._closing or not self._senders:
            self.failed += 1
            raise NotifyFailed("server stopping: the message was not sent")
        try:
            data = payload.encode()
        except UnicodeEncodeError:
            self.failed += 1
            raise NotifyFailed("the message is not valid UTF-8") from None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._queue.put_nowait(Message(data, future, loop.time() + NOTIFY_TIMEOUT))
        try:
            await future
        except NotifyFailed:
            self.failed += 1
            raise
        self.sent += 1

    async def _connect(self, within: float) -> PipelinedConnection:
        return await PipelinedConnection.open(
            self._conninfo, self._connect_kwargs, self._channel, within, statement=NOTIFY
        )

    async def _send_forever(self, slot: int) -> None:
        """One sender: take what is queued, send it on this slot's connection, repeat."""
        queue = self._queue
        backoff = Backoff(initial=0.1, cap=1.0)
        while True:
            batch = [await queue.get()]
            while queue.qsize() and len(batch) < BATCH_MAX:
                batch.append(queue.get_nowait())
            connected = True
            try:
                connected = await self._send_batch(slot, batch)
            except Exception:  # task boundary: a bug must not strand waiters
                log.exception("notify_sender_crashed", sender=slot)
                await self._drop(slot)
                for message in batch:
                    message.fail(UNAVAILABLE)
            finally:
                for message in batch:
                    message.fail(_STOPPING)  # only when cancelled: the rest are settled
                    queue.task_done()
            if connected:
                backoff.reset()
            else:  # the database refused a connection: give it a moment, let others try
                await asyncio.sleep(backoff.next())

    async def _send_batch(self, slot: int, batch: list[Message]) -> bool:
        """Send `batch` on the slot's connection, retrying once what a dying connection lost.

        Returns False when no connection could be opened (every message then failed).
        """
        pending = self._live(batch)
        for attempt in (1, 2):
            if not pending:
                return True
            conn = self._connections[slot]
            if conn is None or conn.error is not None:
                if conn is not None:  # died while idle (its reader saw the socket close)
                    log.warning(
                        "notify_connection_lost", error=conn.error, unanswered=0, action="reconnect"
                    )
                await self._drop(slot)
                try:
                    conn = await self._connect(self._time_left(pending))
                except (psycopg.Error, OSError) as exc:  # TimeoutError is an OSError
                    self._fail(pending, UNAVAILABLE, describe(exc))
                    return False
                self._connections[slot] = conn
            # A silent connection gets half the time left, so a retry still fits in the rest.
            share = 0.5 if attempt == 1 else 1.0
            if attempt == 2:
                self.resent += len(pending)
            lost = await conn.exchange(pending, share * self._time_left(pending))
            if conn.refused:
                log.warning("notify_failed", error=conn.refused[0], count=len(conn.refused))
                conn.refused.clear()
            if not lost:
                return True
            log.warning(
                "notify_connection_lost",
                error=conn.error,
                unanswered=len(lost),
                action="retry" if attempt == 1 else "fail",
            )
            await self._drop(slot)
            pending = self._live(lost)
        if pending:
            self._fail(pending, UNAVAILABLE, "the connection was lost twice")
        return True

    def _live(self, messages: list[Message]) -> list[Message]:
        """The messages still worth sending: waiter still waiting and time left (others fail)."""
        now = asyncio.get_running_loop().time()
        live: list[Message] = []
        late: list[Message] = []
        for message in messages:
            if message.future.done():
                continue  # its waiter went away (a socket closing)
            (live if message.deadline > now else late).append(message)
        if late:
            self._fail(late, UNAVAILABLE, "no connection answered in time")
        return live

    def _time_left(self, pending: list[Message]) -> float:
        """Time left for the oldest message (the first: the queue is FIFO), but not too little."""
        return max(pending[0].deadline - asyncio.get_running_loop().time(), 0.25)

    def _fail(self, messages: list[Message], reason: str, error: str) -> None:
        for message in messages:
            message.fail(reason)
        log.warning("notify_failed", error=error, count=len(messages))

    async def _drop(self, slot: int) -> None:
        conn, self._connections[slot] = self._connections[slot], None
        if conn is not None:
            await conn.close()

    async def sample_queue_usage_forever(self, interval: float) -> None:
        """Keep `queue_usage` current: a full queue makes every NOTIFY in the database fail.

        It uses a connection of its own (opened when needed, replaced when it fails): the
        senders' connections speak nothing but pipelined NOTIFY.
        """
        conn: psycopg.AsyncConnection[Any] | None = None
        try:
            while True:
                try:
                    if conn is None:
                        async with asyncio.timeout(CONNECT_TIMEOUT):
                            conn = await psycopg.AsyncConnection.connect(
                                self._conninfo, **self._connect_kwargs
                            )
                    async with severed_after(conn, NOTIFY_TIMEOUT):
                        cursor = await conn.execute("SELECT pg_notification_queue_usage()")
                        row = await cursor.fetchone()
                    self.queue_usage = float(row[0]) if row is not None else None
                except (psycopg.Error, OSError):  # TimeoutError is an OSError
                    self.queue_usage = None  # unknown while the database is away
                    if conn is not None:
                        sever(conn)
                        await conn.close()
                        conn = None
                await asyncio.sleep(interval)
        finally:
            if conn is not None:
                await conn.close()

    async def close(self) -> None:
        """Send what is queued (for at most CLOSE_GRACE), then stop the senders and disconnect.

        Sockets are closed by now, so little is queued; a database that is down or frozen must
        not hold the shutdown past its budget.
        """
        self._closing = True
        if self._senders:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_GRACE):
                    await self._queue.join()
            for task in self._senders:
                task.cancel()
            await self._lifetime.aclose()  # the task group waits for every sender to end
            self._senders = []
        while not self._queue.empty():
            self._queue.get_nowait().fail(_STOPPING)
            self._queue.task_done()
        for slot in range(len(self._connections)):
            await self._drop(slot)
