"""Reading durable channels back (SPEC 7): wake-ups, the periodic reconcile, catch-up, resume.

The reader follows every durable channel that has a reader in this process, with a cursor per
channel: the last offset handed on. New rows are fetched past the cursor, in offset order, and
handed to `deliver` (which fans them out through the registry), so each message reaches each
socket once and in the channel's commit order (offsets become visible in order: the channel row
lock of `pgws.store_many`).

What makes it lossless: the cursor stays while the channel has readers, whatever happens to the
connections. Wake-ups (NOTIFY on `pgws.wake`, the channel's name as payload) only say "look now";
every RECONCILE_INTERVAL, and at once after the wake-up listener reconnects or the query
connection comes back, one query compares every followed channel's `top` with its cursor and
fetches what is missing. So a lost wake-up, a lost LISTEN connection, a database restart or a
database down for a while all end in a catch-up, without a cap (within retention).

Resume (`subscribe_from`) replays from a client's position up to this reader's cursor, then hands
over to live delivery without an await in between: no duplicate and no gap at the switch.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import psycopg
import structlog

from pgws.config import Config
from pgws.db import durable
from pgws.db.connect import (
    CONNECT_TIMEOUT,
    Backoff,
    connection_kwargs,
    describe,
    sever,
)
from pgws.db.durable import NotRecovered, Replay, StoredMessage
from pgws.db.listener import Listener
from pgws.errors import DatabaseUnavailable
from pgws.positions import parse_position

log = structlog.get_logger("pgws.db.durable_reader")

RECONCILE_INTERVAL = 1.0  # seconds: the longest a lost wake-up delays delivery
FETCH_MAX = 500  # rows per channel per fetch; a catch-up takes as many fetches as it needs
FETCH_BYTES = 4 * 1024 * 1024  # payload per channel per fetch (one large message may pass it)
FETCH_CHANNELS = 200  # channels per fetch query
QUERY_TIMEOUT = 5.0  # a query the database does not answer in this time: connection replaced
RESUME_CONNECTIONS = 2  # resumes come in bursts after a restart: a few at a time is enough
# The wake-up listener always heals itself: a lost one only delays delivery until the reconcile.
WAKE_CHECK_INTERVAL = 1.0

Deliver = Callable[[str, Sequence[StoredMessage]], object]
Gap = Callable[[str], object]
Start = Callable[[Replay | NotRecovered], object]

_TOPS = "SELECT name, epoch, top FROM pgws.channel WHERE name = ANY(%s)"
# The age of the oldest row past the cursors of the channels that are behind (primary-key lookups).
_OLDEST = """
    SELECT extract(epoch FROM now() - min(m.created_at))::float8
    FROM unnest(%s::text[], %s::bigint[]) AS c(name, after)
    JOIN pgws.message AS m ON m.channel = c.name AND m."offset" = c.after + 1
"""


@dataclasses.dataclass(slots=True)
class _Cursor:
    """Where delivery stands on one channel: None offset = not known yet (read at next query)."""

    epoch: str | None = None
    offset: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class ReaderStats:
    """The reader's counters at one moment."""

    channels: int  # durable channels followed
    delivered: int  # rows handed to the registry (once per row, not per socket)
    repairs: int  # reconciles that found rows no wake-up had announced
    caught_up: int  # rows fetched by a reconcile rather than a wake-up
    replayed: int  # rows replayed to resuming subscribers
    recovered: int  # resumes answered with an exact replay
    not_recovered: int  # resumes answered "not recovered"
    gaps: int  # continuity lost on a followed channel (pruned rows, a reset history)
    oldest_undelivered: float  # seconds, at the last reconcile (0: nothing was behind)


class DurableReader:
    """Follows durable channels, delivers their new rows, and resumes subscribers."""

    def __init__(self, config: Config, deliver: Deliver, gap: Gap) -> None:
        self._config = config
        self._deliver = deliver
        self._gap = gap
        self._kwargs: dict[str, Any] = {
            "autocommit": True,
            **connection_kwargs(config.db_uri, "pgws-durable-reader"),
        }
        wake_config = dataclasses.replace(
            config,
            listen_channel=durable.WAKE_CHANNEL,
            check_listener_interval=config.check_listener_interval or WAKE_CHECK_INTERVAL,
        )
        self.wake_listener = Listener(wake_config, self._woken)
        self._cursors: dict[str, _Cursor] = {}
        self._dirty: set[str] = set()
        self._found: set[str] = set()  # marked by the reconcile: their next fetch is a catch-up
        self._pending: set[str] = set()  # followed, starting point not read yet
        self._known: dict[str, asyncio.Event] = {}  # set once a followed channel's start is read
        self._reconcile_due = True
        self._changed = asyncio.Event()
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._idle: list[psycopg.AsyncConnection[Any]] = []  # resume connections
        self._resume_slots = asyncio.Semaphore(RESUME_CONNECTIONS)
        self.delivered = 0
        self.repairs = 0
        self.caught_up = 0
        self.replayed = 0
        self.recovered = 0
        self.not_recovered = 0
        self.gaps = 0
        self.oldest_undelivered = 0.0

    def stats(self) -> ReaderStats:
        """A snapshot of the counters, for /metrics."""
        return ReaderStats(
            channels=len(self._cursors),
            delivered=self.delivered,
            repairs=self.repairs,
            caught_up=self.caught_up,
            replayed=self.replayed,
            recovered=self.recovered,
            not_recovered=self.not_recovered,
            gaps=self.gaps,
            oldest_undelivered=self.oldest_undelivered,
        )

    # --- which channels -------------------------------------------------------------------------

    def follow(self, channel: str) -> None:
        """Start following `channel` from its current top (read at the next query)."""
        if channel not in self._cursors:
            self._cursors[channel] = _Cursor()
            self._pending.add(channel)
            self._known[channel] = asyncio.Event()
            self._changed.set()

    def unfollow(self, channel: str) -> None:
        """Stop following `channel` (its last reader here went away)."""
        self._cursors.pop(channel, None)
        self._dirty.discard(channel)
        self._found.discard(channel)
        self._pending.discard(channel)
        if (known := self._known.pop(channel, None)) is not None:
            known.set()  # nobody waits for a channel nobody reads

    def following(self, channel: str) -> bool:
        """Whether `channel` is followed from a known offset (new rows will be delivered)."""
        cursor = self._cursors.get(channel)
        return cursor is not None and cursor.offset is not None

    async def until_following(self, channels: Iterable[str], within: float) -> bool:
        """Wait (at most `within` seconds) until every followed one of `channels` has its
        starting point read; whether they all have. A socket that waits for this before its
        first write hears that write (SPEC 3: rw sockets receive their own messages)."""
        waits = [known.wait() for ch in channels if (known := self._known.get(ch)) is not None]
        if not waits:
            return True
        try:
            async with asyncio.timeout(within):
                await asyncio.gather(*waits)
        except TimeoutError:
            return False
        return True

    def _started(self, channel: str) -> None:
        if (known := self._known.pop(channel, None)) is not None:
            known.set()

    def _woken(self, channels: list[str]) -> None:
        """Wake-ups from the listener: the payload is the channel that has new rows."""
        for channel in channels:
            if channel in self._cursors:
                self._dirty.add(channel)
        self._changed.set()

    # --- the loop -------------------------------------------------------------------------------

    async def connect(self) -> None:
        """Start-up: LISTEN for wake-ups (with the start-up retries)."""
        await self.wake_listener.connect()

    async def read_forever(self) -> None:
        """Deliver new rows of followed channels until cancelled; survive any outage."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.wake_listener.listen_forever(), name="durable-wake-listener")
            tasks.create_task(self._fetch_forever(), name="durable-reader")

    async def _fetch_forever(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = Backoff(initial=0.2, cap=1.0)
        next_reconcile = loop.time()
        listener_reconnects = self.wake_listener.reconnects
        try:
            while True:
                if not self._dirty and not self._reconcile_due:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(max(next_reconcile - loop.time(), 0.0)):
                            await self._changed.wait()
                self._changed.clear()
                if loop.time() >= next_reconcile:
                    self._reconcile_due = True
                if self.wake_listener.reconnects != listener_reconnects:
                    listener_reconnects = self.wake_listener.reconnects
                    self._reconcile_due = True  # wake-ups sent while it was away are lost
                if self._pending:
                    self._reconcile_due = True  # new channels: read where they stand
                try:
                    conn = await self._connection()
                    if self._reconcile_due:
                        self._reconcile_due = False
                        next_reconcile = loop.time() + RECONCILE_INTERVAL
                        await self._reconcile(conn)
                    await self._catch_up(conn)
                    backoff.reset()
                except (psycopg.OperationalError, OSError) as exc:  # TimeoutError is an OSError
                    log.warning("durable_reader_lost", error=describe(exc), action="reconnect")
                    await self._drop()
                    self._reconcile_due = True  # whatever came meanwhile is read then
                    await asyncio.sleep(backoff.next())
        finally:
            await self._drop()

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                self._conn = await psycopg.AsyncConnection.connect(
                    self._config.db_uri, **self._kwargs
                )
        return self._conn

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            sever(conn)
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()

    async def _reconcile(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Compare every followed channel's top with its cursor; mark the ones behind."""
        names = list(self._cursors)
        self._pending.clear()  # read now (or followed from a resume's top)
        if not names:
            return
        async with asyncio.timeout(QUERY_TIMEOUT):
            cur = await conn.execute(_TOPS, (names,))
            rows = {name: (epoch, top) for name, epoch, top in await cur.fetchall()}
        behind: dict[str, int] = {}
        for name in names:
            cursor = self._cursors.get(name)
            if cursor is None:
                continue  # unfollowed meanwhile
            epoch, top = rows.get(name, (None, 0))
            if cursor.offset is None:  # newly followed: live from here
                cursor.epoch, cursor.offset = epoch, top
                self._started(name)
                continue
            if cursor.epoch is not None and epoch != cursor.epoch:
                # The channel row was deleted (and maybe created again): offsets restart.
                log.warning("durable_history_reset", channel=name)
                cursor.epoch, cursor.offset = epoch, 0
                self._lost_continuity(name)
            elif cursor.epoch is None:
                cursor.epoch = epoch
            if top > cursor.offset:
                behind[name] = cursor.offset
                if name not in self._dirty:
                    self.repairs += 1
                    self._dirty.add(name)
                    self._found.add(name)
        self.oldest_undelivered = 0.0
        if behind:
            async with asyncio.timeout(QUERY_TIMEOUT):
                cur = await conn.execute(_OLDEST, (list(behind), list(behind.values())))
                row = await cur.fetchone()
            if row is not None and row[0] is not None:
                self.oldest_undelivered = max(float(row[0]), 0.0)

    async def _catch_up(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Fetch and deliver every row past the cursors of the marked channels, in order.

        Up to FETCH_CHANNELS channels per query (a burst over many channels costs few round
        trips); a channel with more to read stays marked for the next round.
        """
        while self._dirty:
            chosen = []
            for channel in list(self._dirty)[:FETCH_CHANNELS]:
                self._dirty.discard(channel)
                cursor = self._cursors.get(channel)
                if cursor is not None and cursor.offset is not None:
                    chosen.append((channel, cursor, cursor.offset))
            if not chosen:
                continue
            wanted = [(channel, cursor.epoch, after) for channel, cursor, after in chosen]
            async with asyncio.timeout(QUERY_TIMEOUT):
                found = await durable.fetch_many(conn, wanted, FETCH_MAX, FETCH_BYTES)
            for channel, cursor, after in chosen:
                by_reconcile = channel in self._found
                rows, more = found.get(channel, ([], False))
                if self._cursors.get(channel) is not cursor or cursor.offset != after:
                    continue  # unfollowed, or started anew, while fetching
                if not more:
                    self._found.discard(channel)
                else:
                    self._dirty.add(channel)
                if not rows:
                    continue
                if rows[0].offset != after + 1:
                    self._lost_continuity(channel)  # pruned before this process read them
                cursor.offset = rows[-1].offset
                if cursor.epoch is None:  # the channel's history began after it was followed
                    last = parse_position(rows[-1].position)
                    cursor.epoch = None if last is None else last.epoch
                self.delivered += len(rows)
                if by_reconcile:
                    self.caught_up += len(rows)
                self._deliver(channel, rows)
            if self._dirty:
                await asyncio.sleep(0)  # a long catch-up lets the rest of the process run

    def _lost_continuity(self, channel: str) -> None:
        self.gaps += 1
        self._gap(channel)

    # --- resume ---------------------------------------------------------------------------------

    async def subscribe_from(
        self, channel: str, position: str, start: Start, replay_max: int
    ) -> Replay | NotRecovered:
        """Resume `channel` after `position`: `start(result)` runs at the switch to live.

        See pgws.durable_bus.DurableBus.subscribe_from for the caller's side of the contract.
        Raises DatabaseUnavailable (and does not call `start`) when the database cannot answer.
        """
        async with self._resume_slots:
            # An idle connection may have died meanwhile (a database restart): a resume only
            # reads, so it is asked again once on a fresh connection.
            idle = self._idle.pop() if self._idle else None
            for conn in (idle, None) if idle is not None else (None,):
                try:
                    async with asyncio.timeout(QUERY_TIMEOUT):
                        if conn is None or conn.closed:
                            conn = await psycopg.AsyncConnection.connect(
                                self._config.db_uri, **self._kwargs
                            )
                        result = await self._resume(conn, channel, position, replay_max)
                    break
                except (psycopg.OperationalError, OSError) as exc:
                    if conn is not None:
                        sever(conn)
                        with contextlib.suppress(psycopg.Error, OSError):
                            await conn.close()
                    error = exc
            else:
                raise DatabaseUnavailable(f"database unavailable: {describe(error)}") from None
            self._idle.append(conn)
        # From here to the end: no await, so no live row can slip between replay and live.
        created = channel not in self._cursors
        cursor = self._cursors.setdefault(channel, _Cursor())
        self._pending.discard(channel)
        if cursor.offset is None:
            epoch = None
            if isinstance(result, Replay) and (parsed := parse_position(position)) is not None:
                epoch = parsed.epoch
            cursor.epoch, cursor.offset = epoch, result.top
            self._started(channel)
        elif isinstance(result, Replay) and result.top > cursor.offset:
            # This process has not delivered those yet: they come live, after the replay.
            kept = [m for m in result.messages if m.offset <= cursor.offset]
            result = Replay(kept, cursor.offset)
        elif isinstance(result, NotRecovered):
            result = NotRecovered(result.reason, cursor.offset)
        if isinstance(result, Replay):
            self.recovered += 1
            self.replayed += len(result.messages)
        else:
            self.not_recovered += 1
        try:
            start(result)
        except BaseException:
            if created:
                self.unfollow(channel)
            raise
        return result

    async def _resume(
        self, conn: psycopg.AsyncConnection[Any], channel: str, position: str, replay_max: int
    ) -> Replay | NotRecovered:
        """durable.resume(), then the rows up to this reader's cursor if it is further on."""
        result = await durable.resume(conn, channel, position, replay_max)
        if not isinstance(result, Replay):
            return result
        messages, top = list(result.messages), result.top
        while True:
            cursor = self._cursors.get(channel)
            if cursor is None or cursor.offset is None or cursor.offset <= top:
                return Replay(messages, top)
            # Live delivery is ahead of the snapshot: replay up to it too (no gap at the switch).
            more = await durable.fetch_after(conn, channel, top, min(cursor.offset - top, 10_000))
            if not more:
                return Replay(messages, top)  # pruned or reset meanwhile: the reconcile tells
            messages.extend(more)
            top = more[-1].offset

    async def close(self) -> None:
        """Close the connections (the reading tasks are cancelled separately)."""
        await self.wake_listener.close()
        await self._drop()
        while self._idle:
            conn = self._idle.pop()
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()
