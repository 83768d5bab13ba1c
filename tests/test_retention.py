"""Retention (SPEC 7) on a real PostgreSQL: one pruner at a time, take-over, producers unblocked."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg

from pgws.db import durable_schema
from pgws.db.retention import APPLICATION_NAME, Retention, default_interval, retention_running
from pgws.parsers import ChannelSet
from tests.conftest import TIMEOUT, StartGateway, until

Conn = psycopg.AsyncConnection[Any]
DAY = 86400.0
FAST = 0.01  # seconds between passes: the tests wait for passes, never for time


async def fill(conn: Conn, channels: list[str], per_channel: int, *, aged: int = 0) -> None:
    """`per_channel` messages on each channel; the oldest `aged` of these made two days old."""
    for channel in channels:
        cur = await conn.execute(
            "SELECT pgws.send_many(%s, array_agg(g::text)) FROM generate_series(1, %s) AS g",
            (channel, per_channel),
        )
        row = await cur.fetchone()
        assert row is not None
        last = int(row[0][-1].split(":")[2])
        await conn.execute(
            "UPDATE pgws.message SET created_at = now() - interval '2 days'"
            ' WHERE channel = %s AND "offset" > %s AND "offset" <= %s',
            (channel, last - per_channel, last - per_channel + aged),
        )


async def count(conn: Conn) -> int:
    cur = await conn.execute("SELECT count(*) FROM pgws.message")
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


@contextlib.asynccontextmanager
async def running(*runners: Retention) -> AsyncIterator[list[asyncio.Task[None]]]:
    tasks = [asyncio.create_task(runner.run_forever()) for runner in runners]
    try:
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def deleted(runner: Retention, total: int) -> Callable[[], bool]:
    return lambda: runner.stats().deleted == total


def passes(runner: Retention) -> int:
    stats = runner.stats()
    return stats.prunes + stats.skipped


def test_the_interval_is_a_tenth_of_the_retention_from_one_second_to_a_minute() -> None:
    assert default_interval(DAY) == 60.0
    assert default_interval(100.0) == 10.0
    assert default_interval(2.0) == 1.0


async def test_of_two_runners_one_prunes_and_the_other_takes_over_when_it_stops(
    fresh: Conn, fresh_uri: str
) -> None:
    await fill(fresh, ["a", "b"], 1000, aged=600)
    runners = [Retention(fresh_uri, DAY, interval=FAST), Retention(fresh_uri, DAY, interval=FAST)]
    async with running(*runners) as tasks:
        await until(lambda: all(passes(runner) >= 5 for runner in runners), "5 passes each")
        leading = [runner.stats().pruning for runner in runners]
        assert sorted(leading) == [False, True]
        leader = leading.index(True)
        other = runners[1 - leader]
        assert runners[leader].stats().deleted == 1200
        assert other.stats().prunes == 0
        assert other.stats().deleted == 0
        assert await count(fresh) == 800
        # The pruning process stops: its lock goes with its session, the other one leads.
        tasks[leader].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tasks[leader]
        await fill(fresh, ["a", "b"], 100, aged=100)
        await until(lambda: other.stats().deleted == 200, "the other runner pruning")
        assert other.stats().pruning
    assert await count(fresh) == 800


async def test_a_runner_whose_connection_is_killed_hands_over_and_reconnects(
    fresh: Conn, fresh_uri: str
) -> None:
    first, second = (
        Retention(fresh_uri, DAY, interval=FAST),
        Retention(fresh_uri, DAY, interval=FAST),
    )
    async with running(first):
        await until(lambda: first.stats().pruning, "the first runner leading")
        async with running(second):
            await until(lambda: second.stats().skipped >= 1, "the second runner skipping")
            cur = await fresh.execute(
                "SELECT pg_terminate_backend(l.pid) FROM pg_locks AS l"
                " JOIN pg_stat_activity AS a ON a.pid = l.pid"
                " WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = %s",
                (APPLICATION_NAME,),
            )
            assert await cur.fetchall() == [(True,)]  # exactly one session holds the lock
            await until(lambda: second.stats().pruning, "the second runner taking over")
            await until(lambda: first.stats().failures == 1, "the first runner noticing")
            await until(lambda: first.stats().skipped >= 1, "the first runner back, skipping")
            assert not first.stats().pruning
            await fill(fresh, ["c"], 10, aged=10)
            await until(lambda: second.stats().deleted == 10, "pruning after the take-over")


async def test_a_missing_schema_fails_passes_without_stopping_the_runner(
    fresh_uri: str,
) -> None:
    runner = Retention(fresh_uri, DAY, interval=FAST)
    async with running(runner) as tasks:
        await until(lambda: runner.stats().failures >= 1, "a failed pass")
        assert not tasks[0].done()
        assert runner.stats().prunes == 0
        async with await psycopg.AsyncConnection.connect(fresh_uri, autocommit=True) as conn:
            await durable_schema.migrate(conn)
            await fill(conn, ["late"], 10, aged=10)
            # The back-off after a failure is a second or more: the pass after it prunes.
            await until(lambda: runner.stats().deleted == 10, "pruning once the schema exists")


async def test_producers_wait_on_no_lock_over_repeated_fill_and_prune_cycles(
    fresh: Conn, fresh_uri: str
) -> None:
    producing = [f"live-{n}" for n in range(4)]
    stop = asyncio.Event()
    latencies: list[float] = []
    lock_waits: list[str] = []

    async def produce(channel: str) -> None:
        async with await psycopg.AsyncConnection.connect(fresh_uri, autocommit=True) as conn:
            while not stop.is_set():
                started = time.perf_counter()
                await conn.execute("SELECT pgws.send(%s, 'fresh')", (channel,))
                latencies.append(time.perf_counter() - started)

    async def watch_locks() -> None:
        # A producer waiting on a lock is what "blocked" means; wall-clock time on a shared
        # machine is only printed. Lock `object` is NOTIFY's commit lock, which producers wait on
        # among themselves (SPEC 7 design, trap 2) with or without a prune.
        async with await psycopg.AsyncConnection.connect(fresh_uri, autocommit=True) as conn:
            while not stop.is_set():
                cur = await conn.execute(
                    "SELECT wait_event || ': ' || query FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    " AND wait_event <> 'object' AND query LIKE '%pgws.send(%'"
                )
                lock_waits.extend(query for (query,) in await cur.fetchall())
                await asyncio.sleep(0.002)

    runner = Retention(fresh_uri, DAY, interval=FAST, batch=500)
    background = [asyncio.create_task(produce(channel)) for channel in producing]
    background.append(asyncio.create_task(watch_locks()))
    cycles, expected = 3, 0
    try:
        async with running(runner):
            for _ in range(cycles):
                # Old rows on channels of their own (a fill on the producers' channels would make
                # them wait for its send_many, which is the channel's order lock, not the prune),
                # and the producers' own rows so far, aged in place.
                await fill(fresh, [f"old-{n}" for n in range(4)], 3000, aged=3000)
                cur = await fresh.execute(
                    "UPDATE pgws.message SET created_at = now() - interval '2 days'"
                    " WHERE channel = ANY(%s) AND created_at > now() - interval '1 day'",
                    (producing,),
                )
                expected += 4 * 3000 + cur.rowcount
                await until(deleted(runner, expected), "a prune")
    finally:
        stop.set()
        await asyncio.gather(*background)
    cur = await fresh.execute(
        "SELECT count(*) FROM pgws.message WHERE created_at < now() - %s::interval", ("1 day",)
    )
    assert await cur.fetchone() == (0,)
    assert await count(fresh) + expected - 4 * 3000 * cycles == len(latencies)  # all fresh kept
    report = (
        f"{len(latencies)} pgws.send during {cycles} prunes of {expected} rows:"
        f" median {sorted(latencies)[len(latencies) // 2] * 1000:.1f} ms,"
        f" max {max(latencies) * 1000:.1f} ms"
    )
    print(report)  # noqa: T201 (seen with -s)
    assert lock_waits == [], (report, lock_waits[:20])
    assert max(latencies) < TIMEOUT / 20, report  # a few ms idle; room for a loaded machine


async def test_retention_running_starts_a_runner_and_stops_it_with_the_block(
    fresh: Conn, fresh_uri: str
) -> None:
    await fill(fresh, ["hook"], 10, aged=4)
    async with retention_running(fresh_uri, DAY, interval=FAST) as runner:
        await until(lambda: runner.stats().deleted == 4, "the hook's runner pruning")

    async def lock_holders() -> int:
        cur = await fresh.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (APPLICATION_NAME,),
        )
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    async with asyncio.timeout(TIMEOUT):
        while await lock_holders():  # noqa: ASYNC110 (the backend exits just after the close)
            await asyncio.sleep(0.01)


async def test_a_gateway_in_durable_mode_prunes_and_one_without_does_not_run_retention(
    fresh: Conn, fresh_uri: str, start_gateway: StartGateway
) -> None:
    await fill(fresh, ["served"], 20, aged=5)
    plain = await start_gateway(db_uri=fresh_uri)
    assert plain.gateway.retention is None
    durable_mode = await start_gateway(
        db_uri=fresh_uri, durable=ChannelSet(every=True), durable_retention=DAY
    )
    runner = durable_mode.gateway.retention
    assert runner is not None
    await until(lambda: runner.stats().deleted == 5, "the gateway's first prune")
    assert await count(fresh) == 15


async def test_vacuum_never_truncates_the_message_table(fresh: Conn) -> None:
    """Truncating the table's end takes an ACCESS EXCLUSIVE lock that producers would wait on."""
    cur = await fresh.execute(
        "SELECT reloptions FROM pg_class WHERE oid = 'pgws.message'::regclass"
    )
    assert await cur.fetchone() == (["vacuum_truncate=false"],)
