"""The pool of pipelined senders that turn client messages into NOTIFYs."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections import deque
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
from pgws.publisher import PUBLISHER

log = structlog.get_logger("pgws.db.notifier")

NOTIFY = "SELECT pg_notify($1, $2)"
# How long a NOTIFY may take from notify() to the database's answer (a retry included) before its
# client is told the database is unavailable; a connection that keeps it waiting is presumed dead.
NOTIFY_TIMEOUT = 5.0
# At most this many NOTIFYs go out in one write on one connection.
BATCH_MAX = 256
# A sender with this many NOTIFYs queued or unanswered is busy: the next caller that is not
# pinned goes to the next sender, which opens its connection then if it has none. Few senders
# is the point: NOTIFY commits serialize on one lock in PostgreSQL, and many connections each
# with a few NOTIFYs in flight contend on it (10 senders gave 0.39x the raw NOTIFY rate, 2 gave
# 0.52x). 100 writer sockets with 8 in flight each (session.WINDOW) fill 2 senders, as the raw
# baseline's 2 connections with 200 each.
GROW_AT = 400
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
    connections: int = 0  # sender connections open now (not a metric)


class _Sender:
    """One sender: its queue, its connection (opened when it first has work), its task."""

    __slots__ = ("conn", "index", "pending", "queue", "wake")

    def __init__(self, index: int) -> None:
        self.index = index
        self.queue: deque[Message] = deque()  # not sent yet (or to be sent again), oldest first
        self.conn: PipelinedConnection | None = None
        self.wake = asyncio.Event()  # new work, or the connection broke
        self.pending = 0  # notify() calls waiting on this sender: queued or unanswered


class Notifier:
    """Sends envelopes with `pg_notify(listen_channel, payload)` through a few pipelined senders.

    notify() queues the payload with a future on a sender and waits for it. There are at most
    PGWS_POOL_SIZE senders, started as load needs them: a caller goes to the first sender with
    fewer than GROW_AT NOTIFYs pending, and a new sender (one more connection) starts only when
    every running one is that busy. A caller with NOTIFYs still unanswered stays on the sender it
    has (pinned), so what one caller sends goes down one connection in order. Each sender
    streams: whatever is queued goes out at once in pipeline mode, a Sync after every NOTIFY,
    without waiting for earlier answers, and each future is settled by its own answer. So:

    - every NOTIFY is its own transaction: identical payloads are all delivered, and a payload the
      database refuses fails only its own waiter;
    - a waiter is answered within about NOTIFY_TIMEOUT whatever the database does (at once when
      it refuses connections);
    - a connection that dies costs no message: whatever was unanswered on it is sent once more,
      in the same order and before anything newer, on a fresh connection. Delivery is at least
      once: a NOTIFY committed just before its connection died, its answer lost, is sent twice;
      one lost a second time fails (1011 for its socket);
    - one caller's messages are delivered in order, however many it has in flight.
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
        self._senders: list[_Sender] = []
        self._pins: dict[object, _Sender] = {}  # caller -> sender, while it has NOTIFYs pending
        self._pinned: dict[object, int] = {}  # caller -> how many
        self._idle = asyncio.Event()  # nothing pending anywhere (close() waits for it)
        self._idle.set()
        self._pending = 0
        self._lifetime = contextlib.AsyncExitStack()  # holds the senders' task group while open
        self._group: asyncio.TaskGroup | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        # Live counters, written only here (tests read them); /metrics reads stats().
        self.sent = 0
        self.failed = 0
        self.resent = 0
        self.queue_usage: float | None = None

    def stats(self) -> NotifierStats:
        """A snapshot of the counters, for /metrics."""
        conns = [sender.conn for sender in self._senders if sender.conn is not None]
        return NotifierStats(
            sent=self.sent,
            failed=self.failed,
            resent=self.resent,
            queue_usage=self.queue_usage,
            in_flight=sum(conn.unanswered for conn in conns),
            connections=sum(1 for conn in conns if conn.error is None),
        )

    async def open(self) -> None:
        """Open the first sender's connection (with the start-up retries), then start it.

        The others start when load needs them (GROW_AT), up to PGWS_POOL_SIZE.
        """
        conn = await with_retries(
            "notifier",
            self._retries,
            lambda: self._connect(CONNECT_TIMEOUT),
            where=db_target(self._conninfo),
        )
        # The senders' own task group, entered here and left by close() (the same task must call
        # both): they outlive the gateway's supervised tasks, to send what closing sockets wrote.
        self._group = await self._lifetime.enter_async_context(asyncio.TaskGroup())
        self._start_sender(conn)

    def _start_sender(self, conn: PipelinedConnection | None = None) -> _Sender:
        if self._group is None:
            raise RuntimeError("Notifier.open() has not run")
        sender = _Sender(len(self._senders))
        if conn is not None:
            self._attach(sender, conn)
        self._senders.append(sender)
        name = f"notify-sender-{sender.index}"
        self._tasks.append(self._group.create_task(self._send_forever(sender), name=name))
        return sender

    def _pick(self) -> _Sender:
        """The sender for a caller that has nothing pending: the first that is not busy."""
        senders = self._senders
        for sender in senders:
            if sender.pending < GROW_AT:
                return sender
        if len(senders) < self._size:
            return self._start_sender()
        return min(senders, key=lambda sender: sender.pending)

    async def notify(self, payload: str, *, caller: object = None) -> None:
        """NOTIFY one payload; raise NotifyFailed (with a reason for the client) if it was not.

        `caller` (by default the context's PUBLISHER, else the current task) keeps its NOTIFYs
        in order: while it has some pending, the next ones go to the same sender.
        """
        if self._closing or not self._senders:
            self.failed += 1
            raise NotifyFailed("server stopping: the message was not sent")
        try:
            data = payload.encode()
        except UnicodeEncodeError:
            self.failed += 1
            raise NotifyFailed("the message is not valid UTF-8") from None
        if caller is None:
            caller = PUBLISHER.get()
            if caller is None:
                caller = asyncio.current_task()
        sender = self._pins.get(caller)
        if sender is None:
            sender = self._pins[caller] = self._pick()
            self._pinned[caller] = 1
        else:
            self._pinned[caller] += 1
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        sender.queue.append(Message(data, future, loop.time() + NOTIFY_TIMEOUT))
        sender.pending += 1
        self._pending += 1
        self._idle.clear()
        sender.wake.set()
        try:
            await future
        except NotifyFailed:
            self.failed += 1
            raise
        finally:
            sender.pending -= 1
            self._pending -= 1
            if not self._pending:
                self._idle.set()
            left = self._pinned[caller] - 1
            if left:
                self._pinned[caller] = left
            else:
                del self._pinned[caller], self._pins[caller]
        self.sent += 1

    async def _connect(self, within: float) -> PipelinedConnection:
        return await PipelinedConnection.open(
            self._conninfo, self._connect_kwargs, self._channel, within, statement=NOTIFY
        )

    def _attach(self, sender: _Sender, conn: PipelinedConnection) -> None:
        sender.conn = conn
        conn.on_break = sender.wake.set

    async def _send_forever(self, sender: _Sender) -> None:
        """One sender: send what is queued at once, watch what is unanswered, repeat."""
        backoff = Backoff(initial=0.1, cap=1.0)
        while True:
            try:
                connected = await self._step(sender)
            except Exception:  # task boundary: a bug must not strand waiters
                log.exception("notify_sender_crashed", sender=sender.index)
                self._fail_all(sender, UNAVAILABLE)
                await self._drop(sender)
                connected = True
            if connected:
                backoff.reset()
            else:  # the database refused a connection: give it a moment
                await asyncio.sleep(backoff.next())

    async def _step(self, sender: _Sender) -> bool:
        """Wait for work or trouble, then deal with it; False when no connection could be opened
        (everything queued then failed)."""
        conn = sender.conn
        if not sender.queue:
            await self._wait(sender)
            conn = sender.conn
        elif conn is not None and (oldest := conn.oldest) is not None and _is_overdue(oldest):
            conn.give_up(_overdue(oldest))  # busy, yet nothing comes back
        if conn is not None and conn.refused:
            log.warning("notify_failed", error=conn.refused[0], count=len(conn.refused))
            conn.refused.clear()
        if conn is not None and conn.error is not None:
            self._lost(sender, conn)
            await self._drop(sender)
            conn = None
        if not sender.queue:
            return True
        if conn is None:
            pending = self._live(sender)
            if not pending:
                return True
            try:
                conn = await self._connect(self._time_left(pending[0]))
            except (psycopg.Error, OSError) as exc:  # TimeoutError is an OSError
                self._fail(self._live(sender), UNAVAILABLE, describe(exc))
                return False
            self._attach(sender, conn)
        batch = self._take(sender)
        if batch:
            conn.send(batch)
        return True

    async def _wait(self, sender: _Sender) -> None:
        """Until there is work, the connection breaks, or its oldest NOTIFY is overdue (which
        breaks it: a connection that keeps a NOTIFY waiting is presumed dead)."""
        sender.wake.clear()
        conn = sender.conn
        if sender.queue or (conn is not None and conn.error is not None):
            return  # it broke while sending, say: nothing would wake us for it again
        oldest = conn.oldest if conn is not None else None
        if oldest is None:
            await sender.wake.wait()
            return
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(oldest.mark):
                await sender.wake.wait()
        except TimeoutError:
            if conn is not None and conn.oldest is oldest and oldest.mark <= loop.time():
                conn.give_up(_overdue(oldest))

    def _lost(self, sender: _Sender, conn: PipelinedConnection) -> None:
        """Queue again, first and in order, what a broken connection left unanswered; a NOTIFY
        lost for the second time fails."""
        lost = [message for message in conn.take_unanswered() if not message.future.done()]
        log.warning(
            "notify_connection_lost",
            error=conn.error,
            unanswered=len(lost),
            action="retry" if lost else "reconnect",
        )
        again = [message for message in lost if message.attempt < 2]
        twice = [message for message in lost if message.attempt >= 2]
        if twice:
            self._fail(twice, UNAVAILABLE, "the connection was lost twice")
        self.resent += len(again)
        sender.queue.extendleft(reversed(again))

    def _take(self, sender: _Sender) -> list[Message]:
        """Up to BATCH_MAX live messages off the queue, each given its attempt and its mark."""
        queue = sender.queue
        now = asyncio.get_running_loop().time()
        batch: list[Message] = []
        late: list[Message] = []
        while queue and len(batch) < BATCH_MAX:
            message = queue.popleft()
            if message.future.done():
                continue  # its waiter went away (a socket closing)
            if message.deadline <= now:
                late.append(message)
                continue
            message.attempt += 1
            message.sent_at = now
            # A first attempt gets half the time left, so a retry still fits in the rest.
            left = max(message.deadline - now, 0.25)
            message.mark = now + (0.5 * left if message.attempt == 1 else left)
            batch.append(message)
        if late:
            self._fail(late, UNAVAILABLE, "no connection answered in time")
        if queue:
            sender.wake.set()  # more than one batch: come back for the rest
        return batch

    def _live(self, sender: _Sender) -> list[Message]:
        """The queued messages still worth sending (the late ones fail)."""
        now = asyncio.get_running_loop().time()
        live: list[Message] = []
        late: list[Message] = []
        for message in sender.queue:
            if message.future.done():
                continue
            (live if message.deadline > now else late).append(message)
        if late:
            self._fail(late, UNAVAILABLE, "no connection answered in time")
        sender.queue = deque(live)
        return live

    @staticmethod
    def _time_left(message: Message) -> float:
        return max(message.deadline - asyncio.get_running_loop().time(), 0.25)

    def _fail(self, messages: list[Message], reason: str, error: str) -> None:
        for message in messages:
            message.fail(reason)
        if messages:
            log.warning("notify_failed", error=error, count=len(messages))

    def _fail_all(self, sender: _Sender, reason: str) -> None:
        """Fail everything a sender holds, queued or unanswered."""
        held = list(sender.queue)
        sender.queue.clear()
        if sender.conn is not None:
            held += sender.conn.take_unanswered()
        for message in held:
            message.fail(reason)

    async def _drop(self, sender: _Sender) -> None:
        conn, sender.conn = sender.conn, None
        if conn is not None:
            conn.on_break = None
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
        if self._tasks:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_GRACE):
                    await self._idle.wait()
            for task in self._tasks:
                task.cancel()
            await self._lifetime.aclose()  # the task group waits for every sender to end
            self._tasks = []
        for sender in self._senders:
            self._fail_all(sender, _STOPPING)
            await self._drop(sender)


def _is_overdue(message: Message) -> bool:
    return message.mark <= asyncio.get_running_loop().time()


def _overdue(message: Message) -> str:
    return f"no answer within {message.mark - message.sent_at:.1f} s"
