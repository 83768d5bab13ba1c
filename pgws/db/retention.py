"""Retention (SPEC 7): durable messages older than PGWS_DURABLE_RETENTION are pruned, by one
pgws process at a time.

Every process in durable mode runs a `Retention`; the first to take the pruning advisory lock
(`pg_try_advisory_lock`, never a waiting lock) keeps it on its own connection and prunes every
`interval` seconds with durable.prune() (short delete batches, no lock a producer waits on). The
others try again at each interval and take over when the holder's connection goes (its session
lock goes with it). A failure is logged and retried with back-off: retention never stops the
server.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import structlog

from pgws.db import durable
from pgws.db.connect import Backoff, connection_kwargs, describe

log = structlog.get_logger("pgws.db.retention")

APPLICATION_NAME = "pgws-retention"
INTERVAL_MAX = 60.0  # seconds between prunes with the default day of retention
INTERVAL_MIN = 1.0


def default_interval(retention: float) -> float:
    """How often to prune: a tenth of the retention, from 1 s up to a minute.

    Rows live at most retention + interval; a short retention (tests, accelerated runs) gets
    prunes often enough to keep the table near its steady size.
    """
    return min(INTERVAL_MAX, max(INTERVAL_MIN, retention / 10))


@dataclasses.dataclass(frozen=True, slots=True)
class RetentionStats:
    """What this process's runner has done (for /metrics and tests)."""

    pruning: bool  # holds the lock: this process is the one pruning
    prunes: int  # prune passes this process ran
    deleted: int  # messages they deleted
    skipped: int  # passes left to the process holding the lock
    failures: int  # passes that failed (connection lost, schema missing ...)


class Retention:
    """Prune durable messages past `retention` seconds every `interval`, if this process leads."""

    def __init__(
        self,
        db_uri: str,
        retention: float,
        *,
        interval: float | None = None,
        batch: int = durable.PRUNE_BATCH,
    ) -> None:
        self._db_uri = db_uri
        self.retention = retention
        self.interval = default_interval(retention) if interval is None else interval
        self._batch = batch
        self._pruning = False
        self._prunes = self._deleted = self._skipped = self._failures = 0

    def stats(self) -> RetentionStats:
        return RetentionStats(
            self._pruning, self._prunes, self._deleted, self._skipped, self._failures
        )

    async def run_forever(self) -> None:
        """Connect, prune at each interval while holding the lock; reconnect after a failure."""
        backoff = Backoff(initial=1.0, cap=30.0)
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._db_uri,
                    autocommit=True,
                    **connection_kwargs(self._db_uri, APPLICATION_NAME),
                )
            except (psycopg.Error, OSError) as exc:
                await self._failed("connect", exc, backoff)
                continue
            try:
                async with conn:
                    while True:
                        await self.run_once(conn)
                        backoff.reset()
                        await asyncio.sleep(self.interval)
            except (psycopg.Error, OSError) as exc:
                await self._failed("prune", exc, backoff)

    async def run_once(self, conn: psycopg.AsyncConnection[Any]) -> int | None:
        """One pass: take the lock if free, prune if held; messages deleted, or None (skipped)."""
        if not self._pruning:
            self._pruning = await _try_lock(conn)
            if self._pruning:
                log.info("retention_leading", retention=self.retention, interval=self.interval)
        if not self._pruning:
            self._skipped += 1
            return None
        started = time.perf_counter()
        # prune() takes the lock again (session locks nest) and releases only its own hold.
        deleted = await durable.prune(conn, self.retention, self._batch)
        if deleted is None:  # cannot happen while this session holds the lock
            self._pruning = False
            self._skipped += 1
            return None
        self._prunes += 1
        self._deleted += deleted
        if deleted:
            log.info(
                "retention_pruned",
                deleted=deleted,
                ms=round((time.perf_counter() - started) * 1000, 1),
            )
        return deleted

    async def _failed(self, what: str, exc: BaseException, backoff: Backoff) -> None:
        self._pruning = False  # a lost session lost its lock too
        self._failures += 1
        delay = backoff.next()
        log.warning("retention_failed", what=what, error=describe(exc), retry_in=round(delay, 2))
        await asyncio.sleep(delay)


async def _try_lock(conn: psycopg.AsyncConnection[Any]) -> bool:
    cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (durable._PRUNE_LOCK,))
    row = await cur.fetchone()
    return row is not None and bool(row[0])


@contextlib.asynccontextmanager
async def retention_running(
    db_uri: str, retention: float, *, interval: float | None = None
) -> AsyncIterator[Retention]:
    """Run a Retention in a task for the duration of the block (server.py's hook, durable mode)."""
    runner = Retention(db_uri, retention, interval=interval)
    task = asyncio.create_task(runner.run_forever(), name="retention")
    try:
        yield runner
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
