"""The database side: one LISTEN connection feeding the registry, and a pool that sends NOTIFY.

This is the only module that imports psycopg.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg
import structlog
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from pgws.config import Config
from pgws.errors import DatabaseUnavailable, ListenerLost, NotifyFailed

log = structlog.get_logger("pgws.database")

NOTIFY = "SELECT pg_notify(%s, %s)"
# How long a NOTIFY may wait for a pool connection before the client is told the database is gone.
POOL_WAIT = 5.0
# How long one NOTIFY round trip may take before its connection is presumed dead.
NOTIFY_TIMEOUT = 5.0
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
    return {key: value for key, value in defaults.items() if key not in given}


def db_host(db_uri: str) -> str:
    """Where the database is, for logs: host and port, never the user or password."""
    try:
        info = conninfo_to_dict(db_uri)
    except psycopg.ProgrammingError:
        return "?"
    return f"{info.get('host', 'localhost')}:{info.get('port', 5432)}"


def describe(exc: BaseException) -> str:
    """A one-line, password-free description of a database error."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


async def with_retries(
    what: str, attempts: int, connect: Callable[[], Awaitable[Any]], *, initial: float = 1.0
) -> Any:
    """Call `connect` up to `attempts` times with back-off (SPEC 4); raise DatabaseUnavailable."""
    backoff = Backoff(initial=initial)
    for attempt in range(1, attempts + 1):
        try:
            return await connect()
        except (psycopg.OperationalError, PoolTimeout, OSError) as exc:
            if attempt == attempts:
                raise DatabaseUnavailable(
                    f"cannot connect to the database after {attempts} attempts: {describe(exc)}"
                ) from None
            delay = backoff.next()
            log.warning(
                "database_unreachable",
                what=what,
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


class Listener:
    """The one connection that LISTENs on the listen channel and hands payloads to `on_notify`.

    With `check_listener_interval` set it heals itself: a dead connection (noticed at once when the
    socket closes, or by a probe with a timeout at every interval) is replaced, with back-off, while
    sockets stay open. Without it, losing the connection raises ListenerLost.
    """

    def __init__(self, config: Config, on_notify: Callable[[str], object]) -> None:
        self._config = config
        self._on_notify = on_notify
        self._listen = sql.SQL("LISTEN {}").format(sql.Identifier(config.listen_channel))
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self.up = asyncio.Event()
        self.reconnects = 0
        self.received = 0

    @property
    def backend_pid(self) -> int | None:
        """The server process behind the LISTEN connection, while there is one."""
        conn = self._conn
        return None if conn is None or conn.closed else conn.info.backend_pid

    async def connect(self) -> None:
        """Open the connection and LISTEN, with the start-up retries of SPEC 4."""
        self._conn = await with_retries("listener", self._config.retries, self._open)

    async def _open(self) -> psycopg.AsyncConnection[Any]:
        conn = await psycopg.AsyncConnection.connect(
            self._config.db_uri,
            autocommit=True,
            **connection_kwargs(self._config.db_uri, "pgws-listener"),
        )
        try:
            # Servers with idle_session_timeout set would otherwise drop a quiet listener.
            if conn.info.server_version >= 140000:
                await conn.execute("SET idle_session_timeout = 0")
            await conn.execute(self._listen)
        except BaseException:
            await conn.close()
            raise
        log.info(
            "listener_connected",
            db_host=db_host(self._config.db_uri),
            channel=self._config.listen_channel,
            backend_pid=conn.info.backend_pid,
        )
        self.up.set()
        return conn

    async def listen_forever(self) -> None:
        """Deliver notifications until cancelled; heal or raise ListenerLost when the link dies."""
        interval = self._config.check_listener_interval
        backoff = Backoff(initial=0.5)
        while True:
            if self._conn is None:
                try:
                    self._conn = await self._open()
                    self.reconnects += 1
                    backoff.reset()
                except psycopg.OperationalError as exc:
                    delay = backoff.next()
                    log.warning(
                        "listener_reconnect_failed", error=describe(exc), retry_in=round(delay, 2)
                    )
                    await asyncio.sleep(delay)
                    continue
            try:
                await self._serve(self._conn, interval)
            except (psycopg.Error, TimeoutError) as exc:
                self.up.clear()
                await self._discard()
                if interval is None:
                    log.error("listener_lost", error=describe(exc), action="exit")
                    raise ListenerLost(f"the LISTEN connection was lost: {describe(exc)}") from None
                log.warning("listener_lost", error=describe(exc), action="reconnect")
            except BaseException:
                self.up.clear()
                await self._discard()
                raise

    async def _serve(self, conn: psycopg.AsyncConnection[Any], interval: float | None) -> None:
        on_notify = self._on_notify
        while True:
            async for notify in conn.notifies(timeout=interval):
                self.received += 1
                on_notify(notify.payload)
            # Only reached with an interval: probe the link, so a frozen backend or a silent
            # network path is noticed within about two intervals, not never.
            async with severed_after(conn, max(interval or 0.0, 1.0)):
                await conn.execute("SELECT 1")

    async def _discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            sever(conn)  # the peer may be frozen: never wait on it to say goodbye
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()

    async def close(self) -> None:
        """Close the connection (the task running listen_forever is cancelled separately)."""
        self.up.clear()
        await self._discard()


class Notifier:
    """Sends envelopes with `pg_notify(listen_channel, payload)` through a connection pool."""

    def __init__(self, config: Config) -> None:
        self._channel = config.listen_channel
        self._retries = config.retries
        self._conninfo = config.db_uri
        self._connect_kwargs = {
            "autocommit": True,
            **connection_kwargs(config.db_uri, "pgws-notify"),
        }
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
            config.db_uri,
            min_size=config.pool_size,
            max_size=config.pool_size,
            kwargs=self._connect_kwargs,
            open=False,
            name="pgws-notify",
        )
        self._checking: asyncio.Task[None] | None = None
        self.sent = 0
        self.failed = 0
        self.queue_usage: float | None = None  # pg_notification_queue_usage(), when sampled

    async def open(self) -> None:
        """Open the pool and wait until its connections are ready (with the start-up retries)."""

        async def attempt() -> None:
            await self._pool.open(wait=True, timeout=10.0)

        await with_retries("pool", self._retries, attempt)

    async def notify(self, payload: str) -> None:
        """NOTIFY one payload; a dead pooled connection costs one retry, not the message.

        The retry uses a fresh connection of its own: after a database restart every pooled
        connection is dead, and the pool only finds out one failure at a time.
        """
        try:
            async with (
                self._pool.connection(timeout=POOL_WAIT) as conn,
                severed_after(conn, NOTIFY_TIMEOUT),
            ):
                await conn.execute(NOTIFY, (self._channel, payload))
        except psycopg.OperationalError:
            self._check_pool_soon()
            try:
                await self._notify_on_fresh_connection(payload)
            except (psycopg.Error, OSError, TimeoutError) as exc:
                self._fail(exc)
        except (psycopg.Error, PoolTimeout) as exc:
            self._fail(exc)
        self.sent += 1

    async def _notify_on_fresh_connection(self, payload: str) -> None:
        async with asyncio.timeout(POOL_WAIT):
            conn = await psycopg.AsyncConnection.connect(self._conninfo, **self._connect_kwargs)
        async with conn, severed_after(conn, NOTIFY_TIMEOUT):
            await conn.execute(NOTIFY, (self._channel, payload))

    def _check_pool_soon(self) -> None:
        """Have the pool test its idle connections in the background (one check at a time)."""
        if self._checking is None or self._checking.done():
            self._checking = asyncio.get_running_loop().create_task(
                self._pool.check(), name="pool-check"
            )

    async def sample_queue_usage_forever(self, interval: float) -> None:
        """Keep `queue_usage` current: a full queue makes every NOTIFY in the database fail."""
        while True:
            try:
                async with self._pool.connection(timeout=POOL_WAIT) as conn:
                    cursor = await conn.execute("SELECT pg_notification_queue_usage()")
                    row = await cursor.fetchone()
                self.queue_usage = float(row[0]) if row is not None else None
            except (psycopg.Error, PoolTimeout):
                self.queue_usage = None  # unknown while the database is away
            await asyncio.sleep(interval)

    def _fail(self, exc: BaseException) -> None:
        self.failed += 1
        log.warning("notify_failed", error=describe(exc))
        raise NotifyFailed("database unavailable: the message was not sent") from None

    async def close(self) -> None:
        """Close the pool; NOTIFYs in flight finish first (bounded by the pool's timeout)."""
        if self._checking is not None:
            self._checking.cancel()
            with contextlib.suppress(asyncio.CancelledError, psycopg.Error):
                await self._checking
        # Sockets are closed by now, so nothing is in flight; workers stuck connecting to a
        # database that is down must not hold the shutdown past its budget.
        await self._pool.close(timeout=1.0)
