"""What every LISTEN backend costs PostgreSQL on every NOTIFY: the listener sweep (issue 14).

Before PostgreSQL 19, a NOTIFY's commit signals every backend of the database that LISTENs on
anything, and each of them wakes up to read the shared queue; so each pgws process (one LISTEN
connection each) makes every other process's NOTIFYs dearer. This measures it on a throwaway
cluster: for 1, 4, 16 and 64 LISTEN backends,

- `active`: every backend LISTENs on the notified channel and reads every notification (pgws
  processes whose sockets all hold the channel);
- `idle`: one backend counts the notified channel, the others LISTEN on a channel nobody notifies
  and read nothing (pgws processes whose sockets hold other channels),

while two pipelined connections send NOTIFYs as fast as PostgreSQL takes them, one transaction
each, closed loop. Reported: NOTIFY transactions/s and PostgreSQL CPU (postmaster and every
backend, from /proc) per 1,000 notifications, each as a ratio to one listener in the same run.

    .venv/bin/python -m bench.listeners                 # 1, 4, 16, 64; 3 runs of 5 s each
    .venv/bin/python -m bench.listeners --quick         # 1, 16, 64; 1 run of 2 s
    .venv/bin/python -m bench.listeners --counts 1,8,128 --duration 10

Writes bench/results/listeners.md and listeners.json (the table and every run).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/listeners.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Iterator, Sequence
from typing import Any

import psutil
import psycopg

from bench.pgraw import NotifyCounter, PipelinedNotifier, connect

RESULTS = Path(__file__).resolve().parent / "results"
CHANNEL = "pgws_sweep"
IDLE_CHANNEL = "pgws_sweep_idle"
PAYLOAD = b"x" * 300  # about one pgws envelope
IN_FLIGHT = 200  # per sender: deep enough to keep PostgreSQL busy, shallow enough to drain fast
SENDERS = 2
DRAIN_TIMEOUT = 30.0


@dataclasses.dataclass(frozen=True)
class Run:
    listeners: int
    mode: str  # "active" or "idle"
    rep: int
    seconds: float
    notifies: int
    pg_cpu_seconds: float
    expected: int  # sent since the counters were reset: the window and what was in flight
    received: int  # by the counting listener that saw fewest (every active one must see all)
    queue_usage: float  # pg_notification_queue_usage() at the end of the measured window

    @property
    def rate(self) -> float:
        return self.notifies / self.seconds

    @property
    def cpu_ms_per_1000(self) -> float:
        return 1e6 * self.pg_cpu_seconds / self.notifies if self.notifies else float("nan")


def postgres_cpu_seconds(postmaster_pid: int) -> float:
    """User + system CPU of the postmaster and every live backend (not of exited children)."""
    total = 0.0
    root = psutil.Process(postmaster_pid)
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


async def open_listeners(
    uri: str, count: int, mode: str
) -> tuple[list[NotifyCounter], list[psycopg.AsyncConnection[Any]]]:
    """`count` LISTEN backends: counters on CHANNEL (all of them when active, one when idle)."""
    counters = [await NotifyCounter.open(uri, CHANNEL)]
    idle: list[psycopg.AsyncConnection[Any]] = []
    for _ in range(count - 1):
        if mode == "active":
            counters.append(await NotifyCounter.open(uri, CHANNEL))
        else:
            conn = await connect(uri)
            await conn.execute(f"LISTEN {IDLE_CHANNEL}")
            idle.append(conn)
    return counters, idle


async def send_for(senders: Sequence[PipelinedNotifier], seconds: float) -> int:
    """Keep IN_FLIGHT NOTIFYs queued on each sender for `seconds`; the number acknowledged."""
    stop_at = time.perf_counter() + seconds
    before = sum(sender.acked for sender in senders)

    async def keep_full(sender: PipelinedNotifier) -> None:
        channel = CHANNEL.encode()
        while time.perf_counter() < stop_at:
            while sender.in_flight < IN_FLIGHT:
                sender.send(channel, PAYLOAD)
            if not await sender.wait_below(IN_FLIGHT // 2, within=10):
                raise RuntimeError(f"PostgreSQL stopped answering: {sender.error_message}")

    await asyncio.gather(*(keep_full(sender) for sender in senders))
    return sum(sender.acked for sender in senders) - before


async def wait_received(counter: NotifyCounter, expected: int) -> int:
    """Wait (bounded) until `counter` has seen `expected` notifications; what it saw."""
    reached = asyncio.Event()
    counter.on_count = lambda count: reached.set() if count >= expected else None
    if counter.count < expected:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DRAIN_TIMEOUT):
                await reached.wait()
    counter.on_count = None
    return counter.count


async def measure(
    uri: str, postmaster_pid: int, count: int, mode: str, rep: int, seconds: float
) -> Run:
    counters, idle = await open_listeners(uri, count, mode)
    senders = [await PipelinedNotifier.open(uri) for _ in range(SENDERS)]
    try:
        await send_for(senders, min(1.0, seconds / 4))  # warm up: backends, caches, the queue
        for sender in senders:
            await sender.wait_below(1, within=DRAIN_TIMEOUT)
        await wait_received(counters[0], sum(sender.acked for sender in senders))
        for counter in counters:
            counter.count = 0
        at_reset = sum(sender.acked for sender in senders)
        cpu_before, started = postgres_cpu_seconds(postmaster_pid), time.perf_counter()
        sent = await send_for(senders, seconds)
        elapsed = time.perf_counter() - started
        cpu = postgres_cpu_seconds(postmaster_pid) - cpu_before
        async with await connect(uri) as conn:
            row = await (await conn.execute("SELECT pg_notification_queue_usage()")).fetchone()
        for sender in senders:
            await sender.wait_below(1, within=DRAIN_TIMEOUT)
        # Loss is judged on everything sent since the counters were reset (the window plus
        # what was still in flight when it ended); the rate on the window alone.
        expected = sum(sender.acked for sender in senders) - at_reset
        received = min([await wait_received(c, expected) for c in counters])
        usage = float(row[0]) if row else 0.0
        return Run(count, mode, rep, elapsed, sent, cpu, expected, received, usage)
    finally:
        for sender in senders:
            await sender.close()
        for counter in counters:
            await counter.close()
        for conn in idle:
            await conn.close()


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(runs: Sequence[Run], counts: Sequence[int]) -> list[str]:
    """The markdown table: medians per (listeners, mode), ratios to one listener."""

    def runs_of(count: int, mode: str) -> list[Run]:
        return [run for run in runs if run.listeners == count and run.mode == mode]

    base = runs_of(counts[0], "active") or runs_of(counts[0], "idle")
    base_rate = median([run.rate for run in base])
    base_cpu = median([run.cpu_ms_per_1000 for run in base])
    lines = [
        f"| LISTEN backends | kind | NOTIFY tx/s | ratio to {counts[0]} "
        f"| PostgreSQL CPU ms per 1,000 | ratio to {counts[0]} | spread of tx/s | lost |",
        "|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    for count in counts:
        for mode in ("active", "idle"):
            chosen = runs_of(count, mode)
            if not chosen:
                continue
            rate = median([run.rate for run in chosen])
            cpu = median([run.cpu_ms_per_1000 for run in chosen])
            low, high = min(run.rate for run in chosen), max(run.rate for run in chosen)
            lost = sum(run.expected - run.received for run in chosen)
            lines.append(
                f"| {count} | {mode} | {rate:,.0f} | {rate / base_rate:.2f} | {cpu:.0f} "
                f"| {cpu / base_cpu:.2f} | {low:,.0f} to {high:,.0f} | {lost} |"
            )
    return lines


def machine() -> str:
    load = os.getloadavg()
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, load average before the run "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )


@contextlib.contextmanager
def cluster(pg_cpus: str) -> Iterator[tuple[str, int]]:
    """A throwaway cluster (fsync off, as every benchmark here; its postmaster pid is what the CPU
    is read from), pinned to `pg_cpus` unless 'any'."""
    from dev.devdb import ThrowawayPostgres

    with ThrowawayPostgres(settings={"max_connections": "200"}) as postgres:
        pid = postgres.postmaster_pid()
        if pid is None:
            raise RuntimeError("the throwaway cluster has no postmaster")
        if pg_cpus != "any":
            cpus = {int(cpu) for cpu in pg_cpus.split(",")}
            root = psutil.Process(pid)
            for process in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.cpu_affinity(sorted(cpus))
        yield postgres.uri, pid


async def sweep(args: argparse.Namespace) -> int:
    counts = [int(value) for value in args.counts.split(",")]
    runs: list[Run] = []
    notes = [machine()]
    with cluster(args.pg_cpus) as (uri, pid):
        if args.client_cpus != "any":
            os.sched_setaffinity(0, {int(cpu) for cpu in args.client_cpus.split(",")})
        for rep in range(args.reps):
            # Alternate the order, so that a drift of the machine hits every count alike.
            order = counts if rep % 2 == 0 else list(reversed(counts))
            for count in order:
                for mode in ("active", "idle") if count > 1 else ("active",):
                    run = await measure(uri, pid, count, mode, rep, args.duration)
                    runs.append(run)
                    print(
                        f"{count:>4} {mode:<6} rep {rep}: {run.rate:>9,.0f} NOTIFY/s, "
                        f"{run.cpu_ms_per_1000:6.0f} ms PostgreSQL CPU per 1,000, "
                        f"received {run.received}/{run.expected}",
                        flush=True,
                    )
    lines = [
        "# Listener sweep",
        "",
        f"`python -m bench.listeners {' '.join(sys.argv[1:])}`".replace("  ", " "),
        "",
        *table(runs, counts),
        "",
        f"Machine: {notes[0]}. PostgreSQL pinned to CPU {args.pg_cpus}, the senders and "
        f"listeners (one Python process) to CPU {args.client_cpus}; {SENDERS} pipelined senders,"
        f" {IN_FLIGHT} NOTIFYs in flight each, one transaction per NOTIFY, {len(PAYLOAD)}-byte "
        f"payloads; {args.reps} run(s) of {args.duration:g} s per row, medians. PostgreSQL CPU "
        "is the postmaster's and every backend's user+system time over the window.",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "listeners.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "listeners.json").write_text(
        json.dumps(
            {
                "args": vars(args),
                "machine": notes[0],
                "runs": [dataclasses.asdict(run) | {"rate": run.rate} for run in runs],
            },
            indent=2,
        )
        + "\n"
    )
    print("\n".join(lines))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="1,4,16,64", help="LISTEN backends per row")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured per run")
    parser.add_argument("--reps", type=int, default=3, help="runs per row (medians reported)")
    parser.add_argument("--quick", action="store_true", help="1,16,64; one run of 2 s")
    parser.add_argument("--pg-cpus", default="1", help="CPUs for PostgreSQL, or 'any'")
    parser.add_argument("--client-cpus", default="0", help="CPUs for this process, or 'any'")
    args = parser.parse_args(argv)
    if args.quick:
        args.counts, args.duration, args.reps = "1,16,64", 2.0, 1
    return asyncio.run(sweep(args))


if __name__ == "__main__":
    raise SystemExit(main())
