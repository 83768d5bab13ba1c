"""PostgreSQL's cost per notification as pgws processes are added, with and without one LISTEN
per host (issue 14, item 5: the parts that need no relay).

Every pgws process that LISTENs makes every NOTIFY dearer for PostgreSQL (bench/listeners.py).
This runs real pgws servers on a throwaway cluster with P = 1, 2, 4, 8 processes, two ways:

- `separate`: P `pgws serve` processes on P ports, P LISTEN connections
  (`PGWS_SHARED_LISTENER=false`, as separate hosts would be);
- `shared`: one `pgws serve --workers P` on one port, whose workers share ONE LISTEN
  connection (`PGWS_SHARED_LISTENER=true`, the default);

each with `--readers` legacy sockets per process (held by this process, the load generator, with
bench.loadgen's client) and a fixed-rate NOTIFY producer (`--rate` messages/s, pipelined psycopg,
one transaction each). Reported per row, each as a ratio to P = 1 of the same kind in the same
run: PostgreSQL CPU (postmaster and every backend, from /proc) per 1,000 notifications, delivered
messages per server CPU-second (every pgws process of the row, from /proc), and loss (messages times
readers sent after the probes minus frames received, after a drain: must be 0). The LISTEN
backends column is counted in pg_stat_activity while the row runs, so it shows what the
database really saw. Nothing is pinned: the servers need both cores.

    .venv/bin/python -m bench.processes            # P = 1,2,4,8; 3 runs of 5 s each
    .venv/bin/python -m bench.processes --quick    # 1 run of 3 s (about 1.5 minutes)
    .venv/bin/python -m bench.processes --counts 1,4 --rate 1000 --readers 50

Writes bench/results/processes.md and processes.json (the table and every run); server logs go
to bench/results/raw/processes-<time>/ (not committed).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/processes.py`
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
from collections.abc import AsyncIterator, Sequence

import psutil

from bench.listeners import postgres_cpu_seconds
from bench.loadgen import Client, Pool, Tally, padding
from bench.pgraw import PipelinedNotifier, connect
from bench.procs import free_port, kill_groups, process_tree, spawn, stop
from bench.run import CHANNEL, LISTEN_CHANNEL, LOCK_FILE, SECRET, exclusive, wait_ready
from bench.wire import raise_nofile_limit

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = ("separate", "shared")
TICK = 0.005  # seconds between the producer's sends (it sends what it owes at each)
PROBE_TRIES = 50
READY_TIMEOUT = 30.0


@dataclasses.dataclass(frozen=True)
class Run:
    kind: str
    processes: int
    rep: int
    seconds: float
    notifies: int  # sent in the measured window
    pg_cpu_seconds: float
    server_cpu_seconds: float
    delivered: int  # frames received by the readers in the measured window
    expected: int  # messages sent after the probes, times readers
    received: int  # frames received after the probes, after the drain
    readers: int
    listen_backends: int  # LISTEN connections seen in pg_stat_activity during the window
    readers_per_process: tuple[int, int]  # fewest and most sockets one pgws process held

    @property
    def pg_ms_per_1000(self) -> float:
        return 1e6 * self.pg_cpu_seconds / self.notifies if self.notifies else float("nan")

    @property
    def per_server_cpu_s(self) -> float:
        cpu = self.server_cpu_seconds
        return self.delivered / cpu if cpu else float("nan")

    @property
    def server_cpu_pct(self) -> float:
        return 100 * self.server_cpu_seconds / self.seconds

    @property
    def lost(self) -> int:
        return self.expected - self.received


def tree_cpu(pids: Sequence[int]) -> float:
    """CPU seconds (user + system) of these processes and all their descendants."""
    total = 0.0
    for pid in pids:
        for process in process_tree(pid):
            with contextlib.suppress(psutil.NoSuchProcess):
                times = process.cpu_times()
                total += times.user + times.system
    return total


def sockets_by_process(pids: Sequence[int], ports: Sequence[int]) -> dict[int, int]:
    """Established sockets on `ports` per process of the trees (pgws workers, not supervisors)."""
    counts: dict[int, int] = {}
    for pid in pids:
        for process in process_tree(pid):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                conns = process.net_connections(kind="tcp")
                listening = [c for c in conns if c.status == psutil.CONN_LISTEN]
                if any(c.laddr.port in ports for c in listening):
                    counts[process.pid] = sum(
                        1
                        for c in conns
                        if c.status == psutil.CONN_ESTABLISHED and c.laddr.port in ports
                    )
    return counts


async def listen_backends(uri: str) -> int:
    """Backends whose last statement was a LISTEN: the database's listeners."""
    async with await connect(uri) as conn:
        cursor = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND query ILIKE 'listen %'"
        )
        row = await cursor.fetchone()
    return int(row[0]) if row else 0


@contextlib.asynccontextmanager
async def servers(
    kind: str, processes: int, uri: str, logs: Path, name: str
) -> AsyncIterator[tuple[list[int], list[int]]]:
    """Start the row's pgws processes; yield their pids and ports once every one is serving."""
    started: list[asyncio.subprocess.Process] = []
    ports: list[int] = []
    env = {
        **os.environ,
        "PGWS_DB_URI": uri,
        "PGWS_JWT_SECRET": SECRET,
        "PGWS_HOST": "127.0.0.1",
        "PGWS_LISTEN_CHANNEL": LISTEN_CHANNEL,
        "PGWS_POOL_SIZE": "2",
        "PGWS_SHARED_LISTENER": "true" if kind == "shared" else "false",
    }
    command = [sys.executable, "-m", "pgws", "serve"]
    if kind == "shared":
        command += ["--workers", str(processes)]
    copies = processes if kind == "separate" else 1
    try:
        for index in range(copies):
            port = free_port()
            log_path = logs / f"{name}-server{index}.log"
            with log_path.open("wb") as log:
                started.append(await spawn(command, env={**env, "PGWS_PORT": str(port)}, log=log))
            ports.append(port)
            await wait_ready(started[-1], port, log_path)
        pids = [process.pid for process in started]
        # `--workers P`: the first handshake proves one worker; wait until all P have bound the
        # port, so that the kernel spreads the readers over all of them.
        # Nothing to await but /proc, so poll it (bounded).
        for _ in range(int(READY_TIMEOUT / 0.1)):
            if len(sockets_by_process(pids, ports)) >= processes:
                break
            await asyncio.sleep(0.1)
        else:
            raise RuntimeError(f"{name}: not all {processes} processes bound their port")
        yield pids, ports
    finally:
        for process in started:
            await stop(process)


async def open_readers(
    ports: Sequence[int], per_port: int, tally: Tally
) -> tuple[list[Client], list[Pool]]:
    """`per_port` legacy reader sockets on each port, with bench.loadgen's client."""
    pools, clients = [], []
    for port in ports:
        pool = Pool(
            argparse.Namespace(
                host="127.0.0.1",
                port=port,
                secret=SECRET,
                channel=CHANNEL,
                path_form="token",
                connect_concurrency=32,
                connect_timeout=10.0,
            )
        )
        opened, _ = await pool.open(per_port, "r", tally)
        if len(opened) < per_port:
            raise RuntimeError(f"only {len(opened)} of {per_port} readers: {pool.failures}")
        pools.append(pool)
        clients.extend(opened)
    return clients, pools


async def measure(
    args: argparse.Namespace, uri: str, postmaster: int, kind: str, processes: int, rep: int,
    logs: Path,
) -> Run:  # fmt: skip
    name = f"{kind}-{processes}-{rep}"
    async with servers(kind, processes, uri, logs, name) as (pids, ports):
        tally = Tally()
        per_port = args.readers * processes // len(ports)
        readers, pools = await open_readers(ports, per_port, tally)
        notifier = await PipelinedNotifier.open(uri)
        body = (
            b'{"event":"WebsocketMessage","channel":"%s","payload":"%%d %s",'
            b'"claims":{"mode":"w","channels":["%s"],"message_delivered_at":%%.6f}}'
            % (CHANNEL.encode(), padding(150), CHANNEL.encode())
        )
        listen = LISTEN_CHANNEL.encode()
        sent = 0

        def send_one() -> None:
            nonlocal sent
            notifier.send(listen, body % (sent, time.time()))
            sent += 1

        # Probes until every reader has one: every process (every worker) is fed.
        for _ in range(PROBE_TRIES):
            send_one()
            await tally.wait_for(tally.value + len(readers), within=0.3)
            if all(client.messages for client in readers):
                break
        else:
            raise RuntimeError(f"{name}: not every reader got a probe")
        await tally.wait_quiet(quiet=0.3, within=3)
        sent0, frames0 = sent, tally.value
        running = True

        async def produce() -> None:
            started, owed_base = time.perf_counter(), sent
            while running:
                owed = owed_base + int(args.rate * (time.perf_counter() - started)) - sent
                for _ in range(owed):
                    send_one()
                await asyncio.sleep(TICK)

        producer = asyncio.create_task(produce())
        try:
            await asyncio.sleep(args.warmup)
            t0, pg0, cpu0 = time.perf_counter(), postgres_cpu_seconds(postmaster), tree_cpu(pids)
            sent_start, frames_start = sent, tally.value
            await asyncio.sleep(args.duration / 2)
            listeners = await listen_backends(uri)
            await asyncio.sleep(args.duration / 2)
            t1, pg1, cpu1 = time.perf_counter(), postgres_cpu_seconds(postmaster), tree_cpu(pids)
            sent_end, frames_end = sent, tally.value
            spread = sockets_by_process(pids, ports)
        finally:
            running = False
            await producer
        await notifier.wait_below(1, within=args.drain_timeout)
        expected = (sent - sent0) * len(readers)
        await tally.wait_quiet(quiet=1.0, within=args.drain_timeout, target=frames0 + expected)
        received = tally.value - frames0
        await notifier.close()
        for pool in pools:
            pool.reset_all()
    return Run(
        kind=kind,
        processes=processes,
        rep=rep,
        seconds=t1 - t0,
        notifies=sent_end - sent_start,
        pg_cpu_seconds=pg1 - pg0,
        server_cpu_seconds=cpu1 - cpu0,
        delivered=frames_end - frames_start,
        expected=expected,
        received=received,
        readers=len(readers),
        listen_backends=listeners,
        readers_per_process=(min(spread.values(), default=0), max(spread.values(), default=0)),
    )


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(runs: Sequence[Run], counts: Sequence[int]) -> list[str]:
    """One row per (kind, P): medians, and ratios to P = counts[0] of the same kind."""
    lines = [
        f"| kind | pgws processes | LISTEN backends | readers (per process) "
        f"| PostgreSQL CPU ms per 1,000 NOTIFY | ratio to P={counts[0]} "
        f"| delivered per server CPU-second | ratio to P={counts[0]} | server CPU | lost |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind in KINDS:
        base = [run for run in runs if run.kind == kind and run.processes == counts[0]]
        base_pg = median([run.pg_ms_per_1000 for run in base])
        base_eff = median([run.per_server_cpu_s for run in base])
        for count in counts:
            chosen = [run for run in runs if run.kind == kind and run.processes == count]
            if not chosen:
                continue
            pg = median([run.pg_ms_per_1000 for run in chosen])
            eff = median([run.per_server_cpu_s for run in chosen])
            cpu = median([run.server_cpu_pct for run in chosen])
            listeners = "-".join(sorted({str(run.listen_backends) for run in chosen}))
            low = min(run.readers_per_process[0] for run in chosen)
            high = max(run.readers_per_process[1] for run in chosen)
            lost = sum(run.lost for run in chosen)
            lines.append(
                f"| {kind} | {count} | {listeners} | {chosen[0].readers} ({low}-{high}) "
                f"| {pg:.1f} | {pg / base_pg:.2f} | {eff:,.0f} | {eff / base_eff:.2f} "
                f"| {cpu:.0f}% | {lost} |"
            )
    return lines


def machine() -> str:
    load = os.getloadavg()
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"load average before the run {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )


async def sweep(args: argparse.Namespace) -> int:
    from dev.devdb import DEFAULT_SETTINGS, ThrowawayPostgres

    counts = [int(value) for value in args.counts.split(",")]
    raise_nofile_limit(args.readers * max(counts) + 1024)
    logs = RESULTS / "raw" / time.strftime("processes-%Y%m%d-%H%M%S")
    logs.mkdir(parents=True, exist_ok=True)
    runs: list[Run] = []
    before = machine()
    print(before, flush=True)
    with (
        exclusive(LOCK_FILE, args.wait_lock),
        ThrowawayPostgres(settings=dict(DEFAULT_SETTINGS)) as postgres,
    ):
        postmaster = postgres.postmaster_pid()
        if postmaster is None:
            raise RuntimeError("the throwaway cluster has no postmaster")
        for rep in range(args.reps):
            # Alternate the order, so that a drift of the machine hits every row alike.
            order = counts if rep % 2 == 0 else list(reversed(counts))
            for count in order:
                for kind in KINDS if rep % 2 == 0 else tuple(reversed(KINDS)):
                    run = await measure(args, postgres.uri, postmaster, kind, count, rep, logs)
                    runs.append(run)
                    print(
                        f"{kind:<8} P={count} rep {rep}: {run.listen_backends} LISTEN, "
                        f"{run.pg_ms_per_1000:5.1f} ms PostgreSQL CPU per 1,000, "
                        f"{run.per_server_cpu_s:9,.0f} delivered per server CPU-s "
                        f"({run.server_cpu_pct:.0f}% CPU), lost {run.lost}",
                        flush=True,
                    )
    after = os.getloadavg()
    lines = [
        "# pgws processes on one PostgreSQL: separate LISTENs vs one shared listener",
        "",
        f"`python -m bench.processes {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        "",
        *table(runs, counts),
        "",
        f"Machine: {before}; after the run {after[0]:.2f} {after[1]:.2f} {after[2]:.2f}. "
        "**The machine was shared with other engineers' work and loaded throughout**, so read "
        "the ratios, each taken within this run, not the absolute figures. "
        f"{args.rate:g} NOTIFY/s, one transaction each, from one pipelined psycopg connection "
        f"(this process, which also holds the readers: {args.readers} legacy sockets per pgws "
        "process, spread over a `--workers` server's workers by the kernel); "
        f"{args.reps} run(s) of {args.duration:g} s per row after {args.warmup:g} s of warm-up, "
        "medians; nothing pinned. PostgreSQL CPU is the postmaster's and every backend's "
        "user+system time over the window (the producer's backend included); server CPU is "
        "every pgws process's (supervisor and workers). Lost counts every message sent after "
        "the probes, for every reader, after a drain.",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "processes.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "processes.json").write_text(
        json.dumps(
            {
                "args": vars(args),
                "machine": before,
                "load_after": after,
                "runs": [
                    dataclasses.asdict(run)
                    | {
                        "pg_ms_per_1000": run.pg_ms_per_1000,
                        "per_server_cpu_s": run.per_server_cpu_s,
                        "lost": run.lost,
                    }
                    for run in runs
                ],
            },
            indent=2,
        )
        + "\n"
    )
    print("\n".join(lines))
    return 1 if any(run.lost for run in runs) else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="1,2,4,8", help="pgws processes per row")
    parser.add_argument("--readers", type=int, default=10, help="legacy sockets per process")
    parser.add_argument("--rate", type=float, default=2000.0, help="NOTIFY/s, fixed")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured per run")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=3, help="runs per row (medians reported)")
    parser.add_argument("--drain-timeout", type=float, default=15.0)
    parser.add_argument("--wait-lock", type=float, default=600.0)
    parser.add_argument("--quick", action="store_true", help="one run of 3 s per row")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.reps = 3.0, 1
    import uvloop

    try:
        return uvloop.run(sweep(args))
    finally:
        kill_groups()


if __name__ == "__main__":
    raise SystemExit(main())
