"""Accelerated retention run: does the durable table stay the same size under fill and prune?

SQL producers send `pgws.send_many` batches at a steady rate for --duration seconds while one
`pgws.db.retention.Retention` prunes everything older than --retention seconds (a short
retention makes a day of churn happen in minutes). Every --sample seconds it prints the rows
kept, the heap, index and total size of pgws.message (pg_relation_size, pg_indexes_size,
pg_total_relation_size), its dead tuples and autovacuum count, and the slowest producer call
of the interval. The summary compares the sizes over the run once the table has filled
(after --warmup-windows retention windows): flat means the last size is close to the first and
the largest is not far above either.

    .venv/bin/python -m bench.retention                    # 10 min, retention 30 s, 2000 msg/s
    .venv/bin/python -m bench.retention --quick            # 60 s, retention 10 s
    .venv/bin/python -m bench.retention --duration 3600 --pg-setting autovacuum_naptime=5

Producers seen waiting on a lock (pg_stat_activity, every 10 ms) are counted by lock type.

The database is a throwaway cluster from dev.devdb (fsync off, autovacuum on with its defaults
unless --pg-setting says otherwise), or --db-uri. Writes bench/results/raw/retention-<time>.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/retention.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import contextlib
import datetime
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg

from pgws import logs
from pgws.db import durable_schema
from pgws.db.retention import Retention

REPO = Path(__file__).resolve().parent.parent
RAW = REPO / "bench" / "results" / "raw"
PAYLOAD = "x" * 150
MIB = 2**20
WATCH_PERIOD = 0.01  # seconds between looks at pg_stat_activity for producers waiting on locks

_SAMPLE = """
    SELECT (SELECT count(*) FROM pgws.message),
           pg_relation_size('pgws.message'),
           pg_indexes_size('pgws.message'),
           pg_total_relation_size('pgws.message'),
           n_dead_tup, autovacuum_count
    FROM pg_stat_user_tables WHERE relid = 'pgws.message'::regclass
"""


@contextlib.contextmanager
def database(uri: str | None, settings: dict[str, str]) -> Iterator[str]:
    if uri:
        yield uri
        return
    from dev.devdb import DEFAULT_SETTINGS, ThrowawayPostgres

    with ThrowawayPostgres(settings={**DEFAULT_SETTINGS, **settings}) as postgres:
        yield postgres.uri


class Producers:
    """`connections` producers, each sending send_many of `batch` at its share of `rate`."""

    def __init__(self, uri: str, rate: float, batch: int, connections: int) -> None:
        self.uri, self.batch, self.connections = uri, batch, connections
        self.period = batch * connections / rate  # seconds between one producer's calls
        self.sent = 0
        self.slowest = 0.0  # the slowest call since the last sample
        self.slowest_ever = 0.0
        self.late = 0  # calls that started behind schedule (the producers could not keep up)

    def take_slowest(self) -> float:
        slowest, self.slowest = self.slowest, 0.0
        return slowest

    async def run_one(self, index: int, stop: asyncio.Event) -> None:
        payloads = [PAYLOAD] * self.batch
        async with await psycopg.AsyncConnection.connect(self.uri, autocommit=True) as conn:
            loop = asyncio.get_running_loop()
            due = loop.time() + self.period * index / self.connections
            while not stop.is_set():
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    self.late += 1
                due += self.period
                started = time.perf_counter()
                await conn.execute(
                    "SELECT pgws.send_many(%s, %s)", (f"retention-{index}", payloads)
                )
                took = time.perf_counter() - started
                self.slowest = max(self.slowest, took)
                self.slowest_ever = max(self.slowest_ever, took)
                self.sent += self.batch


_LOCK_WAITS = """
    SELECT wait_event FROM pg_stat_activity
    WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE '%pgws.send%'
"""


async def watch_lock_waits(uri: str, seen: Counter[str], stop: asyncio.Event) -> None:
    """Count producers seen waiting on a lock, by lock type, every WATCH_PERIOD seconds.

    `object` is NOTIFY's commit lock (producers wait on each other's commits, SPEC 7 design trap
    2); `relation` would be a table lock (autovacuum truncating the table's end), `tuple` or
    `transactionid` a row lock.
    """
    async with await psycopg.AsyncConnection.connect(uri, autocommit=True) as conn:
        while not stop.is_set():
            cur = await conn.execute(_LOCK_WAITS)
            seen.update(event for (event,) in await cur.fetchall())
            await asyncio.sleep(WATCH_PERIOD)


async def sample(conn: psycopg.AsyncConnection[Any]) -> dict[str, float]:
    cur = await conn.execute(_SAMPLE)
    row = await cur.fetchone()
    assert row is not None
    rows, heap, index, total, dead, autovacuums = row
    return {
        "rows": rows,
        "heap_mib": heap / MIB,
        "index_mib": index / MIB,
        "total_mib": total / MIB,
        "dead": dead,
        "autovacuums": autovacuums,
    }


async def run(args: argparse.Namespace, uri: str) -> dict[str, Any]:
    async with await psycopg.AsyncConnection.connect(uri, autocommit=True) as conn:
        await durable_schema.migrate(conn)
        await conn.execute("TRUNCATE pgws.message, pgws.channel")
        producers = Producers(uri, args.rate, args.batch, args.connections)
        runner = Retention(uri, args.retention, interval=args.interval)
        stop = asyncio.Event()
        tasks = [asyncio.create_task(producers.run_one(i, stop)) for i in range(args.connections)]
        pruning = asyncio.create_task(runner.run_forever(), name="retention")
        lock_waits: Counter[str] = Counter()
        tasks.append(asyncio.create_task(watch_lock_waits(uri, lock_waits, stop)))
        samples: list[dict[str, float]] = []
        started = time.monotonic()
        print(
            f"rate {args.rate:g} msg/s (send_many of {args.batch} on {args.connections}"
            f" connections), retention {args.retention:g} s, prune every {runner.interval:g} s,"
            f" {args.duration:g} s"
        )
        print("     t      rows  heap MiB  index MiB  total MiB     dead  autovac  slowest ms")
        try:
            while (elapsed := time.monotonic() - started) < args.duration:
                await asyncio.sleep(min(args.sample, args.duration - elapsed))
                point = {
                    "t": time.monotonic() - started,
                    **await sample(conn),
                    "slowest_ms": producers.take_slowest() * 1000,
                    "deleted": runner.stats().deleted,
                }
                samples.append(point)
                print(
                    f"{point['t']:6.0f} {point['rows']:9,.0f} {point['heap_mib']:9.1f}"
                    f" {point['index_mib']:10.1f} {point['total_mib']:10.1f}"
                    f" {point['dead']:8,.0f} {point['autovacuums']:8.0f}"
                    f" {point['slowest_ms']:11.1f}"
                )
        finally:
            stop.set()
            await asyncio.gather(*tasks)
            pruning.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pruning
        steady = [p for p in samples if p["t"] >= args.retention * args.warmup_windows]
        summary: dict[str, Any] = {
            "sent": producers.sent,
            "deleted": runner.stats().deleted,
            "prunes": runner.stats().prunes,
            "late_calls": producers.late,
            "slowest_call_ms": producers.slowest_ever * 1000,
            "lock_waits_seen": dict(lock_waits),
        }
        if steady:
            for key in ("total_mib", "heap_mib", "index_mib", "rows"):
                values = [p[key] for p in steady]
                summary[key] = {"first": values[0], "last": values[-1], "max": max(values)}
            total = summary["total_mib"]
            summary["last_over_first"] = total["last"] / total["first"]
            summary["max_over_first"] = total["max"] / total["first"]
        return {"samples": samples, "summary": summary}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="60 s, retention 10 s")
    parser.add_argument("--duration", type=float, help="seconds (default 600)")
    parser.add_argument("--retention", type=float, help="seconds (default 30)")
    parser.add_argument("--interval", type=float, help="seconds between prunes (default: pgws's)")
    parser.add_argument("--rate", type=float, default=2000.0, help="messages/s in all")
    parser.add_argument("--batch", type=int, default=100, help="payloads per send_many")
    parser.add_argument("--connections", type=int, default=2, help="producer connections")
    parser.add_argument(
        "--sample", type=float, help="seconds between samples (default retention/2)"
    )
    parser.add_argument("--warmup-windows", type=float, default=2.0, help="retention windows")
    parser.add_argument("--db-uri", help="an existing database instead of a throwaway cluster")
    parser.add_argument(
        "--pg-setting", action="append", default=[], metavar="NAME=VALUE", help="repeatable"
    )
    args = parser.parse_args(argv)
    args.duration = args.duration or (60.0 if args.quick else 600.0)
    args.retention = args.retention or (10.0 if args.quick else 30.0)
    args.sample = args.sample or args.retention / 2
    settings = dict(item.split("=", 1) for item in args.pg_setting)
    logs.configure(json=False, level=logging.WARNING)  # the runner's failures only, on stderr
    started = datetime.datetime.now(datetime.UTC)
    with database(args.db_uri, settings) as uri:
        result = asyncio.run(run(args, uri))
    summary = result["summary"]
    print()
    print(json.dumps(summary, indent=1))
    if "total_mib" in summary:
        total = summary["total_mib"]
        print(
            f"pgws.message total size after {args.warmup_windows:g} retention windows:"
            f" first {total['first']:.1f} MiB, last {total['last']:.1f} MiB"
            f" ({summary['last_over_first']:.2f}x), max {total['max']:.1f} MiB"
            f" ({summary['max_over_first']:.2f}x); slowest producer call"
            f" {summary['slowest_call_ms']:.1f} ms; producers seen waiting on locks (every"
            f" {WATCH_PERIOD * 1000:.0f} ms): {summary['lock_waits_seen'] or 'never'}"
        )
    RAW.mkdir(parents=True, exist_ok=True)
    path = RAW / f"retention-{started.strftime('%Y%m%d-%H%M%S')}.json"
    document = {"args": vars(args) | {"db_uri": bool(args.db_uri)}, "settings": settings, **result}
    path.write_text(json.dumps(document, indent=1) + "\n")
    print(f"written: {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
