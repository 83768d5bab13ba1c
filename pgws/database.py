"""The database side: one LISTEN connection feeding the registry, and senders that NOTIFY.

This is the only module that imports psycopg.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg
import structlog
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict

from pgws.config import Config
from pgws.errors import ConfigError, DatabaseUnavailable, NotifyFailed

log = structlog.get_logger("pgws.database")

NOTIFY = "SELECT pg_notify($1, $2)"
# How long a NOTIFY may take from notify() to the database's answer (a retry included) before its
# client is told the database is unavailable; a connection that keeps it waiting is presumed dead.
NOTIFY_TIMEOUT = 5.0
# How long opening a connection may take (the sampler's; senders also stay within NOTIFY_TIMEOUT).
CONNECT_TIMEOUT = 5.0
# At most this many NOTIFYs go out in one batch on one connection.
BATCH_MAX = 256
# How long close() lets the senders finish what is queued before it fails the rest.
CLOSE_GRACE = 1.0
UNAVAILABLE = "database unavailable: the message was not sent"
# Keep the LISTEN connection alive through idle firewalls and notice a dead peer without traffic.
_KEEPALIVES = {
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
    "connect_timeout": "10",
}


class Backoff:
    """Exponential back-off delays: initial, doubling, capped, with a little jitter."""

    def __init__(self, initial: float = 1.0, cap: float = 32.0, jitter: float = 0.1) -> None:
        self._initial, self._cap, self._jitter = initial, cap, jitter
        self._next = initial

    def next(self) -> float:
        """The delay before the next attempt; each call doubles the following one."""
        delay = self._next
        self._next = min(self._next * 2, self._cap)
        return delay * (1 + random.uniform(-self._jitter, self._jitter))  # noqa: S311

    def reset(self) -> None:
        """Start again from the initial delay (after a success)."""
        self._next = self._initial


def connection_kwargs(db_uri: str, application_name: str) -> dict[str, Any]:
    """Connection settings pgws adds, without overriding any the operator put in the URI."""
    try:
        given = conninfo_to_dict(db_uri)
    except psycopg.ProgrammingError:
        given = {}  # a bad URI is reported by the connection attempt itself
    defaults = {**_KEEPALIVES, "application_name": application_name}
    kwargs = {key: value for key, value in defaults.items() if key not in given}
    # Always UTF-8, whatever the role, the database or the URI say: with LATIN1 one writer's
    # euro sign would break the LISTEN connection for everyone (SQL_ASCII passes bytes through).
    kwargs["client_encoding"] = "UTF8"
    return kwargs


def db_host(db_uri: str) -> str:
    """Where the database is, for logs: host and port, never the user or password."""
    try:
        info = conninfo_to_dict(db_uri)
    except psycopg.ProgrammingError:
        return "?"
    return f"{info.get('host', 'localhost')}:{info.get('port', 5432)}"


def db_target(db_uri: str) -> str:
    """Host, port and database name, for error lines: never the user or password."""
    try:
        info = conninfo_to_dict(db_uri)
    except psycopg.ProgrammingError:
        return "?"
    return f"{db_host(db_uri)}/{info.get('dbname', info.get('user', '?'))}"


# Connection failures that no retry can fix: refused credentials, a missing database or role,
# a bad option. They end start-up at once (exit 78) instead of a restart loop.
_PERMANENT_FAILURES = (
    "password authentication failed",
    "no password supplied",
    "authentication failed",
    "does not exist",
    "invalid connection option",
    "invalid sslmode",
    "no pg_hba.conf entry",
    "is not permitted to log in",
    "invalid integer value",
    "invalid value for parameter",
)


def is_permanent(exc: BaseException) -> bool:
    """Whether a connection error says something about the settings rather than the network."""
    text = str(exc).lower()
    return any(marker in text for marker in _PERMANENT_FAILURES)


def describe(exc: BaseException) -> str:
    """A one-line, password-free description of a database error."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


async def with_retries(
    what: str,
    attempts: int,
    connect: Callable[[], Awaitable[Any]],
    *,
    where: str,
    initial: float = 1.0,
) -> Any:
    """Call `connect` up to `attempts` times with back-off (SPEC 4); raise DatabaseUnavailable.

    `where` (db_target()) names the database in every line, since libpq's own text does not
    always (a timeout says only "connection timeout expired").
    """
    backoff = Backoff(initial=initial)
    for attempt in range(1, attempts + 1):
        try:
            return await connect()
        except psycopg.ProgrammingError:
            # Its text may quote the whole connection string, password included.
            raise ConfigError("PGWS_DB_URI", "not a valid connection string") from None
        except (psycopg.OperationalError, OSError) as exc:
            if is_permanent(exc):
                raise ConfigError("PGWS_DB_URI", f"{what} at {where}: {describe(exc)}") from None
            if attempt == attempts:
                raise DatabaseUnavailable(
                    f"cannot connect to the database at {where} after {attempts}"
                    f" attempt{'' if attempts == 1 else 's'}:"
                    f" {describe(exc)}"
                ) from None
            delay = backoff.next()
            log.warning(
                "database_unreachable",
                what=what,
                database=where,
                attempt=attempt,
                error=describe(exc),
                retry_in=round(delay, 2),
            )
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def sever(conn: psycopg.AsyncConnection[Any]) -> None:
    """Shut the connection's socket down under it, so whatever awaits it fails at once.

    Cancelling a psycopg query instead would send a cancel request over a new connection, which
    hangs on exactly the frozen backends and silent networks this is for.
    """
    with contextlib.suppress(OSError, psycopg.Error, ValueError):
        duplicate = socket.socket(fileno=os.dup(conn.fileno()))
        try:
            duplicate.shutdown(socket.SHUT_RDWR)
        finally:
            duplicate.close()


@contextlib.asynccontextmanager
async def severed_after(conn: psycopg.AsyncConnection[Any], seconds: float) -> AsyncIterator[None]:
    """Bound a database round trip: past `seconds` the connection is severed (OperationalError)."""
    timer = asyncio.get_running_loop().call_later(seconds, sever, conn)
    try:
        yield
    finally:
        timer.cancel()


# psycopg 3.3 has no public way to end every statement of a pipeline with its own Sync without
# waiting for the results there and then: `Pipeline.sync()` is a round trip, `_enqueue_sync()` is
# private, and `psycopg.generators` / `psycopg.waiting` are internals. So the senders drive libpq's
# pipeline mode through psycopg's documented `pq` layer (`PGconn.send_query_prepared`,
# `pipeline_sync`, `flush`, `consume_input`, `get_result`; stable since psycopg 3.1), which is
# also what bench/pgraw.py measures as the raw limit. psycopg only opens and closes them.
_STATEMENT = b"pgws_notify"
_SYNC = pq.ExecStatus.PIPELINE_SYNC
_ERRORS = (pq.ExecStatus.FATAL_ERROR, pq.ExecStatus.PIPELINE_ABORTED)
_BAD = pq.ConnStatus.BAD
_STOPPING = "server stopping: the message may not have been sent"


class _Message:
    """One NOTIFY on its way: the payload, its waiter, and when the waiter is to be answered."""

    __slots__ = ("data", "deadline", "error", "future")

    def __init__(self, data: bytes, future: asyncio.Future[None], deadline: float) -> None:
        self.data = data
        self.future = future
        self.deadline = deadline
        self.error: str | None = None  # the database's error; final once this NOTIFY's Sync is back

    def settle(self) -> None:
        """Tell the waiter, if it still waits, how the database answered."""
        if not self.future.done():
            if self.error is None:
                self.future.set_result(None)
            else:
                self.future.set_exception(NotifyFailed("database refused the message"))

    def fail(self, reason: str) -> None:
        """Give up on this message: its waiter gets NotifyFailed(reason)."""
        if not self.future.done():
            self.future.set_exception(NotifyFailed(reason))


class _NotifyConnection:
    """One connection in libpq pipeline mode that sends NOTIFYs, each followed by its own Sync.

    Each NOTIFY is therefore its own implicit transaction: identical payloads never fold into one
    notification, and a statement the database refuses aborts nothing else. A reader callback
    consumes results as they arrive and settles each message when its Sync comes back, so a batch
    costs one write and a few reads. A connection that fails or stays silent too long is broken
    (`error` says why) for good: its owner replaces it.
    """

    def __init__(self, conn: psycopg.AsyncConnection[Any], channel: bytes) -> None:
        self._conn = conn
        self._pg = conn.pgconn
        self._fd = conn.fileno()
        self._channel = channel
        self._loop = asyncio.get_running_loop()
        self._in_flight: deque[_Message] = deque()  # sent or being sent, oldest first
        self._writing = False
        self._drained: asyncio.Future[None] | None = None
        self.error: str | None = None
        self.refused: list[str] = []  # errors of refused NOTIFYs, for the owner to log

    @classmethod
    async def open(
        cls, conninfo: str, kwargs: dict[str, Any], channel: bytes, within: float
    ) -> _NotifyConnection:
        """Connect, enter pipeline mode and prepare the NOTIFY statement, all `within` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        async with asyncio.timeout(within):
            conn = await psycopg.AsyncConnection.connect(conninfo, **kwargs)
        self = cls(conn, channel)
        try:
            pg = self._pg
            pg.nonblocking = 1
            pg.enter_pipeline_mode()
            loop.add_reader(self._fd, self._on_readable)
            prepared = _Message(b"", loop.create_future(), deadline)
            self._in_flight.append(prepared)
            pg.send_prepare(_STATEMENT, NOTIFY.encode())
            pg.pipeline_sync()
            self._flush()
            await self._wait(deadline - loop.time())
            self._check_prepared(prepared)
        except BaseException:
            await self.close()
            raise
        return self

    def _check_prepared(self, prepared: _Message) -> None:
        if self.error is not None:
            raise psycopg.OperationalError(self.error)
        try:
            prepared.future.result()
        except NotifyFailed:
            raise psycopg.OperationalError(f"cannot prepare NOTIFY: {prepared.error}") from None

    async def exchange(self, messages: list[_Message], within: float) -> list[_Message]:
        """Send each message as its own transaction and settle it when the database answers.

        Returns the messages whose answer never came because the connection broke (or gave no
        answer `within` seconds): they may or may not have been committed.
        """
        in_flight, pg, channel = self._in_flight, self._pg, self._channel
        in_flight.extend(messages)
        try:
            for message in messages:
                message.error = None
                pg.send_query_prepared(_STATEMENT, (channel, message.data))
                pg.pipeline_sync()
        except psycopg.OperationalError as exc:
            self._break(describe(exc))
        else:
            self._flush()
        await self._wait(within)
        if self.error is None:
            return []
        lost = list(in_flight)
        in_flight.clear()
        return lost

    async def _wait(self, within: float) -> None:
        """Until every message sent is answered or the connection breaks (silence `within`
        seconds breaks it)."""
        if not self._in_flight or self.error is not None:
            return
        self._drained = self._loop.create_future()
        timer = self._loop.call_later(
            max(within, 0.0), self._break, f"no answer within {within:.1f} s"
        )
        try:
            await self._drained
        finally:
            timer.cancel()
            self._drained = None

    def _flush(self) -> None:
        try:
            pending = self._pg.flush()
        except psycopg.OperationalError as exc:
            self._break(describe(exc))
            return
        if pending:
            if not self._writing:
                self._loop.add_writer(self._fd, self._flush)
                self._writing = True
        elif self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False

    def _on_readable(self) -> None:
        pg = self._pg
        try:
            pg.consume_input()
        except psycopg.OperationalError as exc:
            self._break(describe(exc))
            return
        in_flight = self._in_flight
        empty = 0
        while in_flight and not pg.is_busy():
            result = pg.get_result()
            if result is None:
                empty += 1
                if empty > 1:  # nothing more to read now; never spin here
                    break
                continue
            empty = 0
            status = result.status
            if status == _SYNC:
                message = in_flight.popleft()
                message.settle()
                if message.error is not None:
                    self.refused.append(message.error)
            elif status in _ERRORS and in_flight[0].error is None:
                primary = result.error_field(pq.DiagnosticField.MESSAGE_PRIMARY)
                in_flight[0].error = primary.decode(errors="replace") if primary else "error"
        if pg.status == _BAD:
            self._break(describe(psycopg.OperationalError(pg.get_error_message())))
        elif not in_flight and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _break(self, reason: str) -> None:
        if self.error is not None:
            return
        self.error = reason
        self._loop.remove_reader(self._fd)
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    async def close(self) -> None:
        """Stop watching the socket and close; a broken peer is cut off, never waited on."""
        broken = self.error is not None
        self._break("closed")
        if broken:
            sever(self._conn)
        with contextlib.suppress(psycopg.Error, OSError):
            await self._conn.close()


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
        self._queue: asyncio.Queue[_Message] = asyncio.Queue()
        self._connections: list[_NotifyConnection | None] = [None] * self._size
        self._senders: list[asyncio.Task[None]] = []
        self._closing = False
        self.sent = 0
        self.failed = 0
        self.resent = 0  # NOTIFYs sent again on a fresh connection after theirs died
        self.queue_usage: float | None = None  # pg_notification_queue_usage(), when sampled

    async def open(self) -> None:
        """Open the senders' connections (with the start-up retries), then start the senders."""

        async def attempt() -> list[_NotifyConnection | None]:
            results = await asyncio.gather(
                *(self._connect(CONNECT_TIMEOUT) for _ in range(self._size)),
                return_exceptions=True,
            )
            opened = [conn for conn in results if isinstance(conn, _NotifyConnection)]
            failed = [exc for exc in results if not isinstance(exc, _NotifyConnection)]
            if failed:
                for conn in opened:
                    await conn.close()
                raise failed[0]
            return list(opened)

        self._connections = await with_retries(
            "notifier", self._retries, attempt, where=db_target(self._conninfo)
        )
        loop = asyncio.get_running_loop()
        # Owned here, cancelled and awaited by close(): the gateway's task group never sees them.
        self._senders = [
            loop.create_task(self._send_forever(slot), name=f"notify-sender-{slot}")
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
        self._queue.put_nowait(_Message(data, future, loop.time() + NOTIFY_TIMEOUT))
        try:
            await future
        except NotifyFailed:
            self.failed += 1
            raise
        self.sent += 1

    async def _connect(self, within: float) -> _NotifyConnection:
        return await _NotifyConnection.open(
            self._conninfo, self._connect_kwargs, self._channel, within
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

    async def _send_batch(self, slot: int, batch: list[_Message]) -> bool:
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

    def _live(self, messages: list[_Message]) -> list[_Message]:
        """The messages still worth sending: waiter still waiting and time left (others fail)."""
        now = asyncio.get_running_loop().time()
        live: list[_Message] = []
        late: list[_Message] = []
        for message in messages:
            if message.future.done():
                continue  # its waiter went away (a socket closing)
            (live if message.deadline > now else late).append(message)
        if late:
            self._fail(late, UNAVAILABLE, "no connection answered in time")
        return live

    def _time_left(self, pending: list[_Message]) -> float:
        """Time left for the oldest message (the first: the queue is FIFO), but not too little."""
        return max(pending[0].deadline - asyncio.get_running_loop().time(), 0.25)

    def _fail(self, messages: list[_Message], reason: str, error: str) -> None:
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
            await asyncio.gather(*self._senders, return_exceptions=True)
            self._senders = []
        while not self._queue.empty():
            self._queue.get_nowait().fail(_STOPPING)
            self._queue.task_done()
        for slot in range(len(self._connections)):
            await self._drop(slot)
