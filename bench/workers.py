"""`pgws serve --workers N`: what a second worker buys, measured where a 2-core machine can show it.

On 2 cores the load generator needs most of one, so 2 workers cannot show twice the rate of one
(the last release measured 1.36x). What can be measured is the server's CPU per delivered
message (all its processes together):

- fixed rate: one writer socket at `--rate` messages/s to `--readers` readers (the latency
  scenario), a rate both configurations sustain: server CPU-seconds per million delivered copies,
  and the p99 latency;
- closed loop: the fan-out scenario, as fast as it goes: delivered copies/s, and copies per
  server CPU-second.

If 2 workers deliver nearly as many copies per CPU-second as one, N cores of their own would give
about N times the rate; the overhead is the extra LISTEN connection and each worker parsing every
notification. Nothing is pinned (the workers need both cores); the report says how loaded the
machine was. Every figure is per run, 1 and 2 workers alternating which goes first.

    python -m bench.workers [--readers 1000] [--rate 200] [--reps 3] [--duration 5] [--db-uri URI]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import psutil

from bench.procs import free_port, kill_groups, process_tree, spawn, stop
from bench.run import CHANNEL, LISTEN_CHANNEL, LOCK_FILE, SECRET, database, exclusive, wait_ready

RAW = Path(__file__).resolve().parent / "results" / "raw"


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process and its descendants."""
    total = 0.0
    for proc in process_tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


@contextlib.asynccontextmanager
async def server(
    workers: int, db_uri: str, logs: Path, name: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    """`pgws serve --workers N` on a free port, ready for sockets; stopped at the end."""
    port = free_port()
    env = {
        **os.environ,
        "PGWS_DB_URI": db_uri,
        "PGWS_JWT_SECRET": SECRET,
        "PGWS_HOST": "127.0.0.1",
        "PGWS_PORT": str(port),
        "PGWS_LISTEN_CHANNEL": LISTEN_CHANNEL,
    }
    log_path = logs / f"{name}-server.log"
    with log_path.open("wb") as log:
        command = [sys.executable, "-m", "pgws", "serve", "--workers", str(workers)]
        process = await spawn(command, env=env, log=log)
        try:
            await wait_ready(process, port, log_path)
            yield process, port
        finally:
            await stop(process)


async def loadgen(scenario: list[str], server_pid: int, logs: Path, name: str) -> dict[str, Any]:
    """Run one load-generator scenario; sample the server's CPU at its measure markers."""
    with (logs / f"{name}-loadgen.log").open("wb") as log:
        process = await spawn(
            [sys.executable, "-m", "bench.loadgen", *scenario, "--sync"],
            env=dict(os.environ),
            log=log,
            stdio=True,
        )
        assert process.stdout is not None
        assert process.stdin is not None
        marks: dict[str, tuple[float, float]] = {}
        result: dict[str, Any] = {}
        try:
            async with asyncio.timeout(180):
                async for line in process.stdout:
                    event = json.loads(line)
                    kind = event.get("event")
                    if kind in ("measure_start", "measure_end"):
                        marks[kind] = (time.monotonic(), tree_cpu(server_pid))
                    if kind == "result":
                        result = event
                    if kind != "result":
                        process.stdin.write(b"go\n")
                        await process.stdin.drain()
        finally:
            await stop(process)
    if "error" in result or len(marks) < 2:
        raise RuntimeError(f"{name}: {result.get('error', 'no measurement')}")
    (t0, cpu0), (t1, cpu1) = marks["measure_start"], marks["measure_end"]
    result["server_cpu_s"] = cpu1 - cpu0
    result["server_cpu_pct"] = 100 * (cpu1 - cpu0) / (t1 - t0)
    return result


async def one_run(
    args: argparse.Namespace, db_uri: str, workers: int, rep: int, logs: Path
) -> dict[str, Any]:
    common = [
        "--port", "{port}", "--secret", SECRET, "--channel", CHANNEL,
        "--db-uri", db_uri, "--listen-channel", LISTEN_CHANNEL,
        "--duration", str(args.duration), "--warmup", str(args.warmup),
    ]  # fmt: skip
    figures: dict[str, Any] = {"workers": workers, "rep": rep}
    for kind, extra in (
        ("fixed", ["latency", "--readers", str(args.readers), "--rate", str(args.rate)]),
        ("closed", ["fanout", "--readers", str(args.readers)]),
    ):
        name = f"w{workers}-{kind}-{rep}"
        async with server(workers, db_uri, logs, name) as (process, port):
            scenario = [extra[0], *(part.format(port=port) for part in common), *extra[1:]]
            result = await loadgen(scenario, process.pid, logs, name)
        cpu = result["server_cpu_s"]
        if kind == "fixed":
            copies = result["samples"]
            figures |= {
                "fixed_cpu_pct": result["server_cpu_pct"],
                "fixed_cpu_s_per_million": 1e6 * cpu / copies if copies else float("nan"),
                "fixed_p99_ms": result["p99_ms"],
                "fixed_loss": result["lost"],
            }
        else:
            delivered = result["delivered_per_s"] * result["seconds"]
            figures |= {
                "closed_delivered_per_s": result["delivered_per_s"],
                "closed_cpu_pct": result["server_cpu_pct"],
                "closed_per_cpu_s": delivered / cpu if cpu else float("nan"),
                "closed_loss": result["lost"],
            }
        print(f"  {name}: {json.dumps({k: v for k, v in figures.items() if k.startswith(kind)})}")
    return figures


def summary(runs: list[dict[str, Any]]) -> str:
    """Medians ±half range per figure, and the 2-worker / 1-worker ratio of the medians."""
    keys = [key for key in runs[0] if key not in ("workers", "rep")]
    lines = ["| figure | 1 worker | 2 workers | ratio 2/1 |", "|---|---|---|---|"]
    for key in keys:
        cells, medians = [], []
        for workers in (1, 2):
            values = [run[key] for run in runs if run["workers"] == workers]
            median = statistics.median(values)
            spread = (max(values) - min(values)) / 2 / median * 100 if median else 0.0
            cells.append(f"{median:,.3g} ±{spread:.0f}%")
            medians.append(median)
        ratio = medians[1] / medians[0] if medians[0] else float("nan")
        lines.append(f"| {key} | {cells[0]} | {cells[1]} | {ratio:.3f} |")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    logs = RAW / time.strftime("workers-%Y%m%d-%H%M%S")
    logs.mkdir(parents=True, exist_ok=True)
    print(f"load average {os.getloadavg()}; logs in {logs}")
    runs: list[dict[str, Any]] = []
    with exclusive(LOCK_FILE, args.wait_lock), database(args.db_uri, {}) as (db_uri, _postmaster):
        for rep in range(1, args.reps + 1):
            for workers in (1, 2) if rep % 2 else (2, 1):
                runs.append(await one_run(args, db_uri, workers, rep, logs))  # noqa: PERF401
    print(f"load average after {os.getloadavg()}")
    table = summary(runs)
    print(table)
    (logs / "runs.json").write_text(json.dumps(runs, indent=1))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readers", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200.0, help="fixed-rate messages/s")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--db-uri", help="use this PostgreSQL instead of a throwaway one")
    parser.add_argument("--wait-lock", type=float, default=900.0)
    args = parser.parse_args(argv)
    try:
        return asyncio.run(main_async(args))
    finally:
        kill_groups()


if __name__ == "__main__":
    raise SystemExit(main())
