"""The durable store's SQL API (SPEC 7): storing batches, reading back, resume, pruning.

Library code only: nothing here runs on its own. The schema and the SQL producer functions are in
durable.sql beside this module; durable_schema.py installs and checks it.

Connections: store_batch(), send_wakeups() and fetch_after() work on any connection
(inside a caller's transaction too); resume() and prune() need an autocommit connection, since
each opens transactions of its own (a snapshot; short delete batches).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Sequence
from typing import Any

import psycopg

from pgws.positions import make_position, parse_position

__all__ = [
    "DEFAULT_DURABLE",
    "DEFAULT_MIGRATE",
    "DEFAULT_REPLAY_MAX",
    "DEFAULT_RETENTION",
    "WAKE_CHANNEL",
    "NotRecovered",
    "Reason",
    "Replay",
    "StoredMessage",
    "fetch_after",
    "fetch_many",
    "prune",
    "resume",
    "send_wakeups",
    "store_batch",
    "store_frames",
]

# Defaults of the settings SPEC 7 names (PGWS_DURABLE, _MIGRATE, _RETENTION, _REPLAY_MAX); config.py
# takes them over when durable mode is wired in.
DEFAULT_DURABLE = False
DEFAULT_MIGRATE = True
DEFAULT_RETENTION = 86400.0  # seconds
DEFAULT_REPLAY_MAX = 1000  # messages

WAKE_CHANNEL = "pgws.wake"  # the NOTIFY channel of wake-ups; their payload is the channel
# Advisory lock key ("pgws" in ASCII, then a number; durable_schema has 1): one pruner at a time.
_PRUNE_LOCK = 0x70677773_0002
PRUNE_BATCH = 1000  # rows per delete transaction: each holds its row locks for a few ms only


@dataclasses.dataclass(frozen=True, slots=True)
class StoredMessage:
    """A durable message read back: its offset and position in its channel, and the payload."""

    offset: int
    position: str
    payload: str


async def store_batch(
    conn: psycopg.AsyncConnection[Any], frames: Sequence[tuple[str, str]]
) -> list[str]:
    """Store (channel, payload) frames of many sockets in one transaction; their positions.

    Frames of one channel keep their order. Channels are locked in one fixed order, so that
    concurrent batches cannot deadlock. No wake-up is sent: call send_wakeups() after the commit
    (a NOTIFY in this transaction would serialise every writer's commit, trap 2). One bad frame
    (channel, payload over 16 MiB) fails the whole batch with psycopg.Error: check them first.
    """
    if not frames:
        return []
    async with conn.transaction():
        return await store_frames(conn, frames)


async def store_frames(
    conn: psycopg.AsyncConnection[Any], frames: Sequence[tuple[str, str]]
) -> list[str]:
    """store_batch()'s statement alone, in the caller's open transaction: the caller commits
    (and so knows whether a failure came before the commit, when a retry cannot duplicate)."""
    if not frames:
        return []
    channels = [channel for channel, _ in frames]
    payloads = [payload for _, payload in frames]
    # One statement: every channel's store_many, channels locked in one fixed order.
    cur = await conn.execute(
        """
        SELECT g.ch, pgws.store_many(g.ch, g.payloads)
        FROM (
            SELECT f.ch, array_agg(f.payload ORDER BY f.i) AS payloads
            FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY AS f(ch, payload, i)
            GROUP BY f.ch
            ORDER BY f.ch COLLATE "C"
        ) AS g
        """,
        (channels, payloads),
    )
    per_channel = {channel: iter(positions) for channel, positions in await cur.fetchall()}
    return [next(per_channel[channel]) for channel in channels]


async def send_wakeups(conn: psycopg.AsyncConnection[Any], channels: Iterable[str]) -> None:
    """Wake readers of `channels` up, in a NOTIFY-only transaction of its own (cheap: no WAL)."""
    unique = sorted(set(channels))
    if unique:
        async with conn.transaction():
            await conn.execute(
                "SELECT pg_notify(%s, ch) FROM unnest(%s::text[]) AS ch", (WAKE_CHANNEL, unique)
            )


_FETCH = """
    SELECT m."offset", pgws.channel_hash(m.channel), c.epoch, m.tag, m.payload
    FROM pgws.message AS m JOIN pgws.channel AS c ON c.name = m.channel
    WHERE m.channel = %s AND m."offset" > %s AND m."offset" <= %s
    ORDER BY m."offset"
    LIMIT %s
"""


async def fetch_after(
    conn: psycopg.AsyncConnection[Any], channel: str, offset: int, limit: int
) -> list[StoredMessage]:
    """Up to `limit` messages of `channel` past `offset`, in order (what a wake-up asks for)."""
    return await _fetch(conn, channel, offset, 2**63 - 1, limit)


_FETCH_MANY = """
    SELECT c.i, r."offset", pgws.channel_hash(c.name), ch.epoch, r.tag, r.payload, r.running
    FROM unnest(%(names)s::text[], %(epochs)s::text[], %(afters)s::bigint[])
        WITH ORDINALITY AS c(name, epoch, after, i)
    JOIN pgws.channel AS ch ON ch.name = c.name AND (c.epoch IS NULL OR ch.epoch = c.epoch)
    CROSS JOIN LATERAL (
        SELECT m."offset", m.tag, m.payload,
               sum(octet_length(m.payload)) OVER (ORDER BY m."offset") AS running
        FROM pgws.message AS m
        WHERE m.channel = c.name AND m."offset" > c.after
        ORDER BY m."offset"
        LIMIT %(limit)s
    ) AS r
    WHERE r.running - octet_length(r.payload) < %(budget)s
    ORDER BY c.i, r."offset"
"""


async def fetch_many(
    conn: psycopg.AsyncConnection[Any],
    cursors: Sequence[tuple[str, str | None, int]],
    limit: int,
    budget: int,
) -> dict[str, tuple[list[StoredMessage], bool]]:
    """For each (channel, epoch, offset): up to `limit` messages past it, in order, in one query,
    and whether more may follow (the limit or the budget was reached).

    A channel whose history is no longer `epoch` (its row was deleted and created again) gives
    nothing: offsets of another history mean nothing against this cursor. None: any history.

    Per channel the payloads stop once they pass `budget` bytes (the first message always
    comes), so a catch-up of large messages is read in parts. Channels without new messages are
    left out of the result.
    """
    if not cursors:
        return {}
    names = [channel for channel, _, _ in cursors]
    cur = await conn.execute(
        _FETCH_MANY,
        {
            "names": names,
            "epochs": [epoch for _, epoch, _ in cursors],
            "afters": [after for _, _, after in cursors],
            "limit": limit,
            "budget": budget,
        },
    )
    found: dict[str, list[StoredMessage]] = {}
    full: dict[str, bool] = {}
    for i, offset, channel_hash, epoch, tag, payload, running in await cur.fetchall():
        channel = names[i - 1]
        rows = found.setdefault(channel, [])
        rows.append(StoredMessage(offset, make_position(channel_hash, epoch, offset, tag), payload))
        full[channel] = len(rows) >= limit or running >= budget
    return {channel: (rows, full[channel]) for channel, rows in found.items()}


async def _fetch(
    conn: psycopg.AsyncConnection[Any], channel: str, after: int, upto: int, limit: int
) -> list[StoredMessage]:
    cur = await conn.execute(_FETCH, (channel, after, upto, limit))
    return [
        StoredMessage(offset, make_position(channel_hash, epoch, offset, tag), payload)
        for offset, channel_hash, epoch, tag, payload in await cur.fetchall()
    ]


class Reason(enum.StrEnum):
    """Why a position cannot be resumed from exactly (SPEC 7)."""

    MALFORMED = "malformed"
    UNKNOWN = "unknown"
    OTHER_CHANNEL = "other channel"
    EXPIRED = "older than retention"
    HISTORY_RESET = "history reset"
    TOO_FAR_BEHIND = "too far behind"


@dataclasses.dataclass(frozen=True, slots=True)
class Replay:
    """An exact resume: every message after the position up to `top`, the channel's last offset.

    Live messages past `top` follow (a caller buffers them while replaying, SPEC 7 design).
    """

    messages: list[StoredMessage]
    top: int


@dataclasses.dataclass(frozen=True, slots=True)
class NotRecovered:
    """The position cannot be resumed from exactly; `top` is where live delivery starts."""

    reason: Reason
    top: int


async def resume(
    conn: psycopg.AsyncConnection[Any],
    channel: str,
    position: str,
    replay_max: int = DEFAULT_REPLAY_MAX,
) -> Replay | NotRecovered:
    """The messages of `channel` after `position`, exactly, or why not; never a partial replay.

    One REPEATABLE READ snapshot: a prune running meanwhile cannot take rows out of the replay.
    """
    async with conn.transaction():
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        cur = await conn.execute(
            "SELECT pgws.channel_hash(%s), c.epoch, c.top"
            " FROM (VALUES (1)) AS v LEFT JOIN pgws.channel AS c ON c.name = %s",
            (channel, channel),
        )
        row = await cur.fetchone()
        assert row is not None  # noqa: S101 (one row by construction)
        channel_hash, epoch, top = row[0], row[1], row[2] or 0
        parsed = parse_position(position)
        if parsed is None:
            return NotRecovered(Reason.MALFORMED, top)
        if parsed.channel_hash != channel_hash:
            return NotRecovered(Reason.OTHER_CHANNEL, top)
        if epoch is None:
            return NotRecovered(Reason.UNKNOWN, top)  # no history (yet, or since a reset)
        if parsed.epoch != epoch:
            return NotRecovered(Reason.HISTORY_RESET, top)
        if parsed.offset > top:
            return NotRecovered(Reason.UNKNOWN, top)  # never given out (a failover lost it)
        if top - parsed.offset > replay_max:
            return NotRecovered(Reason.TOO_FAR_BEHIND, top)
        cur = await conn.execute(
            'SELECT tag FROM pgws.message WHERE channel = %s AND "offset" = %s',
            (channel, parsed.offset),
        )
        if (tag := await cur.fetchone()) is None:
            return NotRecovered(Reason.EXPIRED, top)  # pruned: rows go oldest first
        if tag[0] != parsed.tag:
            return NotRecovered(Reason.UNKNOWN, top)  # the offset was given out again
        messages = await _fetch(conn, channel, parsed.offset, top, top - parsed.offset)
    return Replay(messages, top)


async def prune(
    conn: psycopg.AsyncConnection[Any], retention: float, batch: int = PRUNE_BATCH
) -> int | None:
    """Delete messages older than `retention` seconds in short batches; how many, or None when
    another process is pruning (one at a time; this one does not wait).

    Each batch is its own transaction and locks only the old rows it deletes, so producers
    (which insert new rows and update channel rows) never wait on it.
    """
    if not conn.autocommit:
        raise ValueError("prune() needs an autocommit connection")
    cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (_PRUNE_LOCK,))
    locked = await cur.fetchone()
    if locked is None or not locked[0]:
        return None
    try:
        cur = await conn.execute("SELECT now() - make_interval(secs => %s)", (retention,))
        cutoff = await cur.fetchone()
        assert cutoff is not None  # noqa: S101
        deleted = 0
        while True:
            cur = await conn.execute(
                """
                DELETE FROM pgws.message AS m
                USING (
                    SELECT channel, "offset" FROM pgws.message
                    WHERE created_at < %s
                    ORDER BY created_at
                    LIMIT %s
                    FOR UPDATE SKIP LOCKED
                ) AS old
                WHERE m.channel = old.channel AND m."offset" = old."offset"
                """,
                (cutoff[0], batch),
            )
            deleted += cur.rowcount
            if cur.rowcount < batch:
                return deleted
    finally:
        await conn.execute("SELECT pg_advisory_unlock(%s)", (_PRUNE_LOCK,))
