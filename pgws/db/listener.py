"""The one connection that LISTENs on the listen channel and hands payloads to the registry.

psycopg opens it; after that pgws reads it through psycopg's documented `pq` layer
(`consume_input`, `notifies`, `get_result`) instead of `AsyncConnection.notifies()`, for three
reasons measured on real bursts:

- `notifies()` decodes every payload itself, so one notification that is not UTF-8 (a SQL_ASCII
  database) ends the generator and the connection; here it is counted, logged once and skipped;
- while a probe query runs, psycopg queues every notification that arrives and its deadline
  cannot tell a dead link from one busy delivering megabytes; here any notification read counts
  as a sign of life, so a burst never gets the listener replaced (and the burst lost);
- what one read of the socket brought is visible as one batch, delivered with a yield to the
  event loop every DELIVERY_SLICE seconds so /health, slow-consumer drops and other sockets run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import psycopg
import structlog
from psycopg import pq, sql

from pgws.config import Config
from pgws.db.connect import (
    CONNECT_TIMEOUT,
    Backoff,
    connection_kwargs,
    db_host,
    db_target,
    describe,
    sever,
    with_retries,
)
from pgws.errors import ListenerLost

log = structlog.get_logger("pgws.db.listener")

# How long delivering a burst may hold the event loop before it lets everything else run.
DELIVERY_SLICE = 0.01
# A part of a batch handed on at once: a few dozen large notifications or a few hundred small.
BATCH_BYTES = 64 * 1024
BATCH_MAX = 256
_PROBE = b"SELECT 1"
_OK = (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK, pq.ExecStatus.EMPTY_QUERY)


class ProbeTimeout(TimeoutError):
    """The database neither answered the probe nor sent anything else in time."""


class _Wire:
    """One LISTEN connection driven through libpq: queries out, notifications and results in."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._pgconn = conn.pgconn
        self._fd = conn.fileno()
        self._loop = asyncio.get_running_loop()
        self._readable = asyncio.Event()
        self._loop.add_reader(self._fd, self._readable.set)
        self.pending = 0  # queries sent whose results are not all back yet

    def close(self) -> None:
        """Stop watching the socket (before psycopg closes or reuses the connection)."""
        self._loop.remove_reader(self._fd)

    def send(self, query: bytes) -> None:
        """Send one simple query (several statements allowed); its results are read by read()."""
        self._pgconn.send_query(query)
        self.pending += 1
        self._pgconn.flush()

    async def readable(self, within: float | None) -> None:
        """Wait until the socket has something to read, at most `within` seconds."""
        if not self._readable.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within):
                    await self._readable.wait()
        self._readable.clear()

    def read(self) -> tuple[list[bytes], bool]:
        """What libpq holds now: payloads, and whether a query finished. Raises if the link died."""
        pgconn = self._pgconn
        pgconn.consume_input()  # psycopg.OperationalError when the server or the network went away
        if pgconn.flush() == 1:
            self._readable.set()  # the rest of a query is still to go: come back soon
        finished = False
        while self.pending and not pgconn.is_busy():
            result = pgconn.get_result()
            if result is None:
                self.pending -= 1
                finished = True
            elif result.status not in _OK:
                message = result.error_message.decode("utf-8", "replace").strip()
                raise psycopg.OperationalError(message or "the listener's query failed")
        payloads = []
        while (notify := pgconn.notifies()) is not None:
            payloads.append(notify.extra)
        if pgconn.status == pq.ConnStatus.BAD:
            message = pgconn.error_message.decode("utf-8", "replace").strip()
            raise psycopg.OperationalError(message or "the LISTEN connection went bad")
        return payloads, finished


@dataclasses.dataclass(frozen=True, slots=True)
class ListenerStats:
    """The LISTEN connection's state and counters at one moment (Listener.stats())."""

    up: bool
    received: int  # notifications handed on
    undecodable: int  # skipped: the payload was not UTF-8
    reconnects: int  # times the connection was replaced


class Listener:
    """The LISTEN connection, feeding `on_batch` with the payloads in the order received.

    A batch is what one read of the socket brought, cut into parts of at most BATCH_BYTES of
    payload so that one part's fan-out stays short; the consumer writes each part to every socket
    at once (pgws.fanout).

    With `check_listener_interval` set it heals itself: a dead connection (noticed at once when the
    socket closes, or by a probe sent after an interval without traffic) is replaced, with
    back-off, while sockets stay open. Without it, losing the connection raises ListenerLost.
    """

    def __init__(
        self,
        config: Config,
        on_batch: Callable[[list[str]], object],
        on_reconnect: Callable[[], object] | None = None,
    ) -> None:
        self._config = config
        self._on_batch = on_batch
        # Called once LISTEN holds again after a loss: what was sent meanwhile is gone (SPEC 8 gap).
        self._on_reconnect = on_reconnect
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._wire: _Wire | None = None
        # Live state, written only here: `up` is awaited and read by /ready; counters by tests.
        self.up = asyncio.Event()
        self.reconnects = 0
        self.received = 0
        self.undecodable = 0

    def stats(self) -> ListenerStats:
        """A snapshot of the state and counters, for /metrics."""
        return ListenerStats(
            up=self.up.is_set(),
            received=self.received,
            undecodable=self.undecodable,
            reconnects=self.reconnects,
        )

    @property
    def backend_pid(self) -> int | None:
        """The server process behind the LISTEN connection, while there is one."""
        conn = self._conn
        return None if conn is None or conn.closed else conn.info.backend_pid

    async def connect(self) -> None:
        """Open the connection and LISTEN, with the start-up retries of SPEC 4."""
        await with_retries(
            "listener", self._config.retries, self._open, where=db_target(self._config.db_uri)
        )

    async def _open(self, *, resumed: bool = False) -> None:
        conn = await psycopg.AsyncConnection.connect(
            self._config.db_uri,
            autocommit=True,
            **connection_kwargs(self._config.db_uri, "pgws-listener"),
        )
        self._conn, self._wire = conn, _Wire(conn)
        try:
            setup = [sql.SQL("LISTEN {}").format(sql.Identifier(self._config.listen_channel))]
            if conn.info.server_version >= 140000:
                # Servers with idle_session_timeout set would otherwise drop a quiet listener.
                setup.insert(0, sql.Composed([sql.SQL("SET idle_session_timeout = 0")]))
            if conn.info.parameter_status("server_encoding") == "SQL_ASCII":
                # SQL_ASCII stores any bytes, and to a UTF8 client PostgreSQL would end this
                # connection (FATAL) at the first notification that is not UTF-8. Take the bytes
                # as stored; _deliver() decodes them and skips what is not UTF-8.
                setup.insert(0, sql.Composed([sql.SQL("SET client_encoding = 'SQL_ASCII'")]))
            early: list[bytes] = []  # what arrived once LISTEN held, before _open returned
            async with asyncio.timeout(CONNECT_TIMEOUT):
                for statement in setup:  # one at a time: LISTEN stays what pg_stat_activity shows
                    self._wire.send(statement.as_bytes(conn))
                    early += await self._until_answered(self._wire)
        except BaseException:
            await self._discard()
            raise
        log.info(
            "listener_connected",
            db_host=db_host(self._config.db_uri),
            channel=self._config.listen_channel,
            backend_pid=conn.info.backend_pid,
        )
        self.up.set()
        if resumed:
            self.reconnects += 1
            if self._on_reconnect is not None:
                self._on_reconnect()  # before anything heard since: readers reload, then go on
        await self._deliver(early)

    async def _until_answered(self, wire: _Wire) -> list[bytes]:
        """Read until every query sent is answered; return the notifications that came."""
        payloads: list[bytes] = []
        while wire.pending:
            await wire.readable(None)
            payloads += wire.read()[0]
        return payloads

    async def listen_forever(self) -> None:
        """Deliver notifications until cancelled; heal or raise ListenerLost when the link dies."""
        interval = self._config.check_listener_interval
        # Capped low: the listener was up before, and while it is down readers are blind and
        # writers' messages are lost, so it must be back within seconds of the database.
        backoff = Backoff(initial=0.5, cap=2.0)
        while True:
            while self._wire is None:
                try:
                    await self._open(resumed=True)
                    backoff.reset()
                except (psycopg.OperationalError, TimeoutError) as exc:
                    delay = backoff.next()
                    log.warning(
                        "listener_reconnect_failed", error=describe(exc), retry_in=round(delay, 2)
                    )
                    await asyncio.sleep(delay)
            try:
                await self._serve(self._wire, interval)
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

    async def _serve(self, wire: _Wire, interval: float | None) -> None:
        loop = asyncio.get_running_loop()
        # A probe that gets no answer, and no notification either, for this long means a frozen
        # backend or a silent network path: noticed within about two intervals, not never.
        probe_timeout = max(interval or 0.0, 1.0)
        since = loop.time()  # the last sign of life (anything read), or when the probe went out
        while True:
            wait = None
            if interval is not None:
                limit = probe_timeout if wire.pending else interval
                wait = max(0.0, since + limit - loop.time())
            await wire.readable(wait)
            # Read even when the wait timed out: on a starved loop the answer may be sitting in
            # the socket already, and only what was read can tell a slow link from a dead one.
            payloads, answered = wire.read()
            if payloads or answered:
                since = loop.time()
            await self._deliver(payloads)
            if interval is None:
                continue
            limit = probe_timeout if wire.pending else interval
            if loop.time() - since < limit:
                continue
            if wire.pending:
                raise ProbeTimeout(f"no answer from the database within {limit:g} s of the probe")
            # Quiet for a whole interval: ask, rather than wait forever on a dead link.
            wire.send(_PROBE)
            since = loop.time()

    async def _deliver(self, payloads: list[bytes]) -> None:
        on_batch = self._on_batch
        loop = asyncio.get_running_loop()
        # Fan-out cost grows with readers x notifications, so yield by time, not by count:
        # /health, slow-consumer drops and other sockets wait at most one slice.
        slice_ends = loop.time() + DELIVERY_SLICE
        part: list[str] = []
        size = 0
        for payload in payloads:
            try:
                text = payload.decode("utf-8")
            except UnicodeDecodeError as exc:
                self._skip_undecodable(exc)
                continue
            part.append(text)
            size += len(payload)
            if size < BATCH_BYTES and len(part) < BATCH_MAX:
                continue
            self.received += len(part)
            on_batch(part)
            part, size = [], 0
            if loop.time() >= slice_ends:
                await asyncio.sleep(0)
                slice_ends = loop.time() + DELIVERY_SLICE
        if part:
            self.received += len(part)
            on_batch(part)

    def _skip_undecodable(self, exc: UnicodeDecodeError) -> None:
        # A SQL_ASCII database passes whatever bytes a producer sent; no reader could use them.
        self.undecodable += 1
        if self.undecodable == 1:
            log.warning(
                "notification_undecodable",
                error=f"not UTF-8 at byte {exc.start} of {len(exc.object)}",
                action="skipped; later ones are only counted (pgws_notifications_undecodable)",
            )

    async def _discard(self) -> None:
        wire, self._wire = self._wire, None
        conn, self._conn = self._conn, None
        if wire is not None:
            wire.close()
        if conn is not None and not conn.closed:
            sever(conn)  # the peer may be frozen: never wait on it to say goodbye
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()

    async def close(self) -> None:
        """Close the connection (the task running listen_forever is cancelled separately)."""
        self.up.clear()
        await self._discard()
