"""Benchmark pgws against minimal baselines, in one run, on this machine.

Starts a throwaway PostgreSQL, then for each repetition and scenario starts the server under
test (default `pgws serve`) and the raw gateway (`bench.raw_gateway`) as subprocesses pinned to
one core, drives them with `bench.loadgen` pinned to another, and samples CPU and memory of
every process involved. Raw psycopg NOTIFY (no gateway) is measured alongside. Writes
bench/results/latest.{md,json,png}; logs and per-run records go to bench/results/raw/.

    python -m bench.run                 # full suite, about 8 minutes
    python -m bench.run --quick         # every scenario, shorter and fewer runs, about 2 minutes
    python -m bench.run --server-cmd "pgws serve" --only fanout,latency --reps 5
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/run.py`: make `bench` and `pgws` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from importlib import metadata
from typing import Any

import psutil

from bench import report
from bench.procs import (
    Sampler,
    Snapshot,
    free_port,
    kill_groups,
    pinned,
    process_tree,
    rss_bytes,
    spawn,
    stop,
)
from bench.wire import make_token, probe, raise_nofile_limit

REPO = Path(__file__).resolve().parent.parent


def repo_relative(command: Sequence[str]) -> list[str]:
    """The command as committed results show it: paths inside the repository made relative."""
    shown = []
    for word in command:
        path = Path(word)
        if path.is_absolute() and path.is_relative_to(REPO):
            word = str(path.relative_to(REPO))
        shown.append(word)
    return shown


RESULTS = REPO / "bench" / "results"
SECRET = "pgws-bench-secret-0123456789abcdef"
LISTEN_CHANNEL = "postgres-websockets-listener"
CHANNEL = "bench"
BASELINE = "raw-gw"
RAW_PG = "raw-pg"
SCENARIO_KINDS = ("connections", "fanout", "ingest", "latency", "notify", "sql", "durable", "v2")
# The server under test with every channel durable (SPEC 7), for the `durable` kind.
DURABLE_ENV = {"PGWS_DURABLE": "true"}
READY_TIMEOUT = 30.0  # seconds for a server to accept a WebSocket
SETTLE = 0.5  # seconds for a server to finish its work on new sockets before measuring memory
BUSY_LOAD = 0.5  # 1-minute load average per core above which the machine counts as busy
BUSY_OTHER_PCT = 15.0  # CPU % (of one core) used by processes not ours during a measurement
BUSY_WAIT_PCT = 5.0  # % of a measurement the server was runnable but not running
LOCK_FILE = Path(tempfile.gettempdir()) / "pgws-bench.lock"  # one benchmark at a time per machine
LOADGEN_LIMIT_PCT = 90.0  # loadgen CPU + run-queue wait above this: it may be the limit


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """How many runs of what, for how long."""

    reps: int
    warmup: float
    duration: float
    fanout_readers: tuple[int, ...]
    # NOTIFYs per producer transaction: 1 (each its own), 10 (several arrive in one read).
    fanout_per_transaction: tuple[int, ...]
    ingest_writers: tuple[int, ...]
    latency_rates: tuple[int, ...]
    latency_readers: int
    connection_steps: tuple[int, ...]
    notify_connections: int
    # SQL producers (no gateway): payloads per call; 1 is pgws.send, more is pgws.send_many.
    sql_batches: tuple[int, ...]
    # Durable mode, each beside the same scenario without it: writers, readers, msg/s.
    durable_ingest_writers: tuple[int, ...]
    durable_fanout_readers: tuple[int, ...]
    durable_latency_rates: tuple[int, ...]
    kinds: tuple[str, ...]


FULL = Plan(
    reps=3,
    warmup=1.0,
    duration=5.0,
    fanout_readers=(100, 1000, 5000),
    fanout_per_transaction=(1, 10),
    ingest_writers=(10, 100),
    latency_rates=(100, 1000),
    latency_readers=100,
    connection_steps=(1000, 5000, 10000),
    notify_connections=2,
    sql_batches=(1, 10, 100),
    durable_ingest_writers=(100,),
    durable_fanout_readers=(1000,),
    durable_latency_rates=(1000,),
    kinds=SCENARIO_KINDS,
)
QUICK = dataclasses.replace(FULL, reps=2, warmup=0.3, duration=1.0)


@dataclasses.dataclass(frozen=True)
class Target:
    """A server to measure: a name and the command that runs it."""

    name: str
    command: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Placement:
    """Which CPUs each party may use; None means unpinned."""

    server: tuple[int, ...] | None
    loadgen: tuple[int, ...] | None
    postgres: tuple[int, ...] | None

    def describe(self) -> str:
        """One line for the report."""

        def cpus(value: tuple[int, ...] | None) -> str:
            return "any CPU" if value is None else "CPU " + ",".join(map(str, value))

        return (
            f"server on {cpus(self.server)}, load generator on {cpus(self.loadgen)}, "
            f"PostgreSQL on {cpus(self.postgres)}"
        )


class ScenarioError(RuntimeError):
    """A scenario could not produce a result."""


# --- one run -----------------------------------------------------------------------------------


class Bench:
    """State shared by every run: database, placement, targets, plan and output."""

    def __init__(
        self,
        *,
        db_uri: str,
        postmaster: int | None,
        placement: Placement,
        plan: Plan,
        raw_dir: Path,
        pool_size: int,
        server_env: dict[str, str],
    ) -> None:
        self.db_uri = db_uri
        self.postmaster = postmaster
        self.placement = placement
        self.plan = plan
        self.raw_dir = raw_dir
        self.pool_size = pool_size
        self.server_env = server_env
        self.runs: list[dict[str, Any]] = []
        self.counter = 0

    def log_path(self, name: str) -> Path:
        """A numbered file in the raw folder."""
        self.counter += 1
        return self.raw_dir / f"{self.counter:03d}-{name}.log"

    @contextlib.asynccontextmanager
    async def server(
        self, target: Target, kind: str, rep: int, extra_env: dict[str, str] | None = None
    ) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
        """Start a server, wait until it accepts a WebSocket, stop it (and its tree) at the end."""
        port = free_port()
        env = {
            **os.environ,
            "PGWS_DB_URI": self.db_uri,
            "PGWS_JWT_SECRET": SECRET,
            "PGWS_HOST": "127.0.0.1",
            "PGWS_PORT": str(port),
            "PGWS_LISTEN_CHANNEL": LISTEN_CHANNEL,
            "PGWS_POOL_SIZE": str(self.pool_size),
            **(self.server_env if target.name != BASELINE else {}),
            **(extra_env or {}),
        }
        path = self.log_path(f"{target.name}-{kind}-{rep}-server")
        with path.open("wb") as log:
            process = await spawn(pinned(self.placement.server, target.command), env=env, log=log)
            try:
                await wait_ready(process, port, path)
                yield process, port
            finally:
                status = await stop(process)
                if status not in (0, -signal.SIGTERM):
                    print(f"    note: {target.name} exited with {status} (log: {path})")

    async def loadgen(
        self,
        scenario: str,
        arguments: Sequence[str],
        on_event: Callable[[dict[str, Any], asyncio.subprocess.Process], Awaitable[None]],
        label: str,
    ) -> dict[str, Any]:
        """Run one loadgen scenario to its `result` line, passing other events to `on_event`."""
        command = pinned(
            self.placement.loadgen,
            [sys.executable, "-m", "bench.loadgen", scenario, *arguments],
        )
        limit = self.plan.warmup + self.plan.duration + 180
        result: dict[str, Any] | None = None
        path = self.log_path(f"{label}-loadgen")
        with path.open("wb") as log:
            process = await spawn(command, env=None, log=log, stdio=True)
            assert process.stdout is not None
            try:
                async with asyncio.timeout(limit):
                    while line := await process.stdout.readline():
                        event = json.loads(line)
                        if event["event"] == "result":
                            result = event
                        else:
                            await on_event(event, process)
                    await process.wait()
            except TimeoutError:
                raise ScenarioError(f"loadgen took longer than {limit:.0f} s") from None
            finally:
                await stop(process, grace=2)
        if result is None:
            raise ScenarioError(f"loadgen gave no result (exit {process.returncode}; log: {path})")
        if "error" in result:
            raise ScenarioError(result["error"])
        return result

    def common_args(self, port: int) -> list[str]:
        """Arguments every loadgen scenario takes."""
        return [
            f"--port={port}",
            f"--secret={SECRET}",
            f"--channel={CHANNEL}",
            f"--db-uri={self.db_uri}",
            f"--listen-channel={LISTEN_CHANNEL}",
            f"--warmup={self.plan.warmup}",
            f"--duration={self.plan.duration}",
            "--sync",
        ]

    async def measured(
        self,
        target: str,
        scenario: str,
        rep: int,
        server_pid: int | None,
        port: int,
        loadgen_scenario: str,
        arguments: list[str],
    ) -> dict[str, Any]:
        """One loadgen run with CPU sampled over its measured window; returns the run record."""
        label = f"{target}-{scenario}-{rep}"
        windows: list[tuple[Snapshot, Snapshot]] = []
        opened: Snapshot | None = None
        sampler: Sampler | None = None
        checkpoints: list[dict[str, Any]] = []
        rss_before = rss_bytes(server_pid)

        async def on_event(event: dict[str, Any], process: asyncio.subprocess.Process) -> None:
            nonlocal sampler, opened
            if sampler is None:
                sampler = Sampler(server_pid, self.postmaster, process.pid)
            if event["event"] == "measure_start":
                opened = sampler.snapshot()
            elif event["event"] in ("measure_end", "checkpoint") and opened is not None:
                windows.append((opened, sampler.snapshot()))
                opened = None
            if event["event"] == "checkpoint":
                await asyncio.sleep(SETTLE)
                checkpoints.append({**event, "server_rss": rss_bytes(server_pid)})
            assert process.stdin is not None
            process.stdin.write(b"ok\n")  # every marker gets an answer (loadgen --sync)
            await process.stdin.drain()

        record: dict[str, Any] = {"target": target, "scenario": scenario, "rep": rep}
        started = time.perf_counter()
        try:
            result = await self.loadgen(
                loadgen_scenario, [*self.common_args(port), *arguments], on_event, label
            )
        except ScenarioError as exc:
            record["error"] = str(exc)
            self.runs.append(record)
            print(f"  {label}: ERROR {exc}")
            return record
        metrics = {k: v for k, v in result.items() if k not in ("event", "scenario", "steps")}
        if windows:
            metrics |= Sampler.shares(windows)
        if checkpoints:
            metrics |= connection_metrics(rss_before, checkpoints)
            record["checkpoints"] = checkpoints
        record["metrics"] = metrics
        record["seconds"] = time.perf_counter() - started
        self.runs.append(record)
        print(f"  {label}: {headline(scenario, metrics)}")
        return record


def connection_metrics(rss_before: int, checkpoints: list[dict[str, Any]]) -> dict[str, float]:
    """Server memory at each step, memory per idle socket, handshakes/s over all steps."""
    metrics: dict[str, float] = {"rss_mib_0": rss_before / 2**20}
    for point in checkpoints:
        metrics[f"rss_mib_{point['step']}"] = point["server_rss"] / 2**20
    last = checkpoints[-1]
    if last["sockets"]:
        metrics["kib_per_socket"] = (last["server_rss"] - rss_before) / last["sockets"] / 1024
    opened = sum(point["opened"] for point in checkpoints)
    seconds = sum(point["seconds"] for point in checkpoints)
    metrics["handshakes_per_s"] = opened / seconds if seconds else 0.0
    metrics["failed"] = last["failed"]
    metrics["sockets"] = last["sockets"]
    return metrics


def headline(scenario: str, metrics: dict[str, Any]) -> str:
    """A short progress line for one run."""
    scenario = scenario.removeprefix("durable-").removeprefix("v2-")
    cpu = (
        f"CPU: server {metrics.get('server_cpu_pct', 0):.0f}% "
        f"(+{metrics.get('server_wait_pct', 0):.0f}% waiting), "
        f"loadgen {metrics.get('loadgen_cpu_pct', 0):.0f}% "
        f"(+{metrics.get('loadgen_wait_pct', 0):.0f}%), "
        f"pg {metrics.get('pg_cpu_pct', 0):.0f}%, other {metrics.get('other_cpu_pct', 0):.0f}%"
    )
    if scenario.startswith("fanout"):
        return f"{metrics['delivered_per_s']:,.0f} msg/s, loss {metrics['loss_frac']:.2%}; {cpu}"
    if scenario.startswith("sql"):
        return f"{metrics['messages_per_s']:,.0f} messages/s committed; {cpu}"
    if scenario.startswith(("ingest", "notify")):
        return f"{metrics['seen_per_s']:,.0f} NOTIFY/s, loss {metrics['loss_frac']:.2%}; {cpu}"
    if scenario.startswith("latency"):
        return (
            f"p50 {metrics['p50_ms']:.2f} p95 {metrics['p95_ms']:.2f} "
            f"p99 {metrics['p99_ms']:.2f} ms, loss {metrics['loss_frac']:.2%}; {cpu}"
        )
    steps = ", ".join(
        f"{key[8:]}: {value:.0f} MiB"
        for key, value in metrics.items()
        if key.startswith("rss_mib_")
    )
    return (
        f"{metrics.get('sockets', 0):,.0f} sockets, {metrics.get('handshakes_per_s', 0):,.0f} "
        f"handshakes/s, {metrics.get('kib_per_socket', 0):.1f} KiB/socket ({steps}); "
        f"failed {metrics.get('failed', 0):.0f}"
    )


async def wait_ready(process: asyncio.subprocess.Process, port: int, log: Path) -> None:
    """Retry a WebSocket handshake until one succeeds; fail if the server exits or never does."""
    path = "/" + make_token(SECRET, {"mode": "r", "channels": [CHANNEL]})
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT
    while loop.time() < deadline:
        if process.returncode is not None:
            raise ScenarioError(f"server exited with {process.returncode}: {tail(log)}")
        with contextlib.suppress(OSError, TimeoutError, asyncio.IncompleteReadError):
            if await probe("127.0.0.1", port, path, within=2.0) == 101:
                return
        await asyncio.sleep(0.1)
    raise ScenarioError(f"server not ready after {READY_TIMEOUT:.0f} s: {tail(log)}")


def tail(path: Path, lines: int = 5) -> str:
    """The last lines of a log, for error messages."""
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- the suite ---------------------------------------------------------------------------------


def fanout_key(readers: int, per_transaction: int) -> str:
    """`fanout-1000` (one NOTIFY per transaction, the historical key) or `fanout-1000-x10`."""
    return f"fanout-{readers}" + ("" if per_transaction == 1 else f"-x{per_transaction}")


def configurations(plan: Plan, kind: str) -> list[tuple[str, list[str]]]:
    """(scenario name, load generator arguments) for every configuration of one kind."""
    if kind == "connections":
        return [(kind, ["--steps", *map(str, plan.connection_steps)])]
    if kind == "fanout":
        return [
            (fanout_key(n, k), [f"--readers={n}", f"--per-transaction={k}"])
            for n in plan.fanout_readers
            for k in plan.fanout_per_transaction
        ]
    if kind == "v2":  # pgws.v2 readers (SPEC 8), each against legacy fanout-N of the same run
        return [
            (f"v2-fanout-{n}", [f"--readers={n}", "--protocol=v2"]) for n in plan.fanout_readers
        ]
    if kind == "ingest":
        return [(f"ingest-{n}", [f"--writers={n}"]) for n in plan.ingest_writers]
    if kind == "latency":
        readers = f"--readers={plan.latency_readers}"
        return [(f"latency-{rate}", [f"--rate={rate}", readers]) for rate in plan.latency_rates]
    return []


def durable_configurations(plan: Plan) -> list[tuple[str, str, list[str]]]:
    """(scenario name, loadgen scenario, arguments) of the durable kind: each the same as its
    non-durable namesake, but ingest counts rows stored and fan-out's producer calls pgws.send."""
    configs = [
        (f"durable-ingest-{n}", "ingest", [f"--writers={n}", "--count=stored"])
        for n in plan.durable_ingest_writers
    ]
    configs += [
        (f"durable-fanout-{n}", "fanout", [f"--readers={n}", "--producer=send"])
        for n in plan.durable_fanout_readers
    ]
    readers = f"--readers={plan.latency_readers}"
    configs += [
        (f"durable-latency-{rate}", "latency", [f"--rate={rate}", readers])
        for rate in plan.durable_latency_rates
    ]
    return configs


async def run_durable(bench: Bench, target: Target, rep: int) -> None:
    """The server under test with PGWS_DURABLE=true: durable ingest, fan-out and latency."""
    try:
        async with bench.server(target, "durable", rep, DURABLE_ENV) as (process, port):
            for scenario, loadgen, arguments in durable_configurations(bench.plan):
                await bench.measured(
                    target.name, scenario, rep, process.pid, port, loadgen, arguments
                )
    except ScenarioError as exc:
        bench.runs.append(
            {"target": target.name, "scenario": "durable", "rep": rep, "error": str(exc)}
        )
        print(f"  {target.name}-durable-{rep}: ERROR {exc}")


async def run_kind(bench: Bench, target: Target, kind: str, rep: int) -> None:
    """Start one server and run every configuration of one scenario kind against it."""
    if kind == "durable":
        if target.name != BASELINE:  # the raw gateway has no durable mode
            await run_durable(bench, target, rep)
        return
    if kind == "v2" and target.name == BASELINE:  # the raw gateway speaks no pgws.v2
        return
    try:
        async with bench.server(target, kind, rep) as (process, port):
            loadgen = "fanout" if kind == "v2" else kind
            for scenario, arguments in configurations(bench.plan, kind):
                await bench.measured(
                    target.name, scenario, rep, process.pid, port, loadgen, arguments
                )
    except ScenarioError as exc:
        bench.runs.append({"target": target.name, "scenario": kind, "rep": rep, "error": str(exc)})
        print(f"  {target.name}-{kind}-{rep}: ERROR {exc}")


async def run_suite(bench: Bench, targets: Sequence[Target]) -> None:
    """Every repetition of every scenario; targets alternate order so drift hits both alike."""
    plan = bench.plan
    for rep in range(1, plan.reps + 1):
        print(f"repetition {rep}/{plan.reps}")
        order = list(targets) if rep % 2 else list(reversed(targets))
        for kind in plan.kinds:
            if kind == "sql":
                await run_sql(bench, targets, rep)
                continue
            if kind == "notify":
                await bench.measured(
                    RAW_PG,
                    "notify",
                    rep,
                    None,
                    0,
                    "notify",
                    [f"--connections={plan.notify_connections}"],
                )
                continue
            for target in order:
                await run_kind(bench, target, kind, rep)


def sql_key(batch: int) -> str:
    """`sql-send` (pgws.send), `sql-send-many-10`, or `sql-notify` (batch 0: pg_notify)."""
    return {0: "sql-notify", 1: "sql-send"}.get(batch, f"sql-send-many-{batch}")


async def run_sql(bench: Bench, targets: Sequence[Target], rep: int) -> None:
    """SQL producers, no gateway: pg_notify (raw-pg), then pgws.send and send_many (pgws)."""
    under_test = next((target.name for target in targets if target.name != BASELINE), None)
    for batch in (0, *bench.plan.sql_batches):
        if batch and under_test is None:
            continue
        producer = {0: "pg_notify", 1: "send"}.get(batch, "send_many")
        await bench.measured(
            under_test if batch and under_test else RAW_PG,
            sql_key(batch),
            rep,
            None,
            0,
            "sqlsend",
            [f"--producer={producer}", f"--batch={max(batch, 1)}"],
        )


def table_rows(plan: Plan, target: str = "pgws") -> list[report.Row]:
    """The rows of the report, with the issue's targets where it sets one (`target`: the server
    under test, baseline of the send_many rows)."""
    rows: list[report.Row] = []

    def add(
        scenario: str, label: str, metric: str, metric_label: str, unit: str, **kw: Any
    ) -> None:
        kw.setdefault("baseline_target", BASELINE)
        kw.setdefault("baseline_scenario", scenario)
        rows.append(
            report.Row(
                scenario=scenario,
                label=label,
                metric=metric,
                metric_label=metric_label,
                unit=unit,
                **kw,
            )
        )

    fanout_goals = {1000: 0.8, 5000: 0.7}
    for readers in plan.fanout_readers:
        for per_tx in plan.fanout_per_transaction:
            key = fanout_key(readers, per_tx)
            shape = "1 NOTIFY" if per_tx == 1 else f"{per_tx} NOTIFYs"
            label = f"fan-out, {readers:,} readers, {shape} per transaction"
            goal = fanout_goals.get(readers) if per_tx == 1 else None
            add(
                key, label, "delivered_per_s", "delivered msg/s", "rate", better="higher", goal=goal
            )
            add(key, label, "server_cpu_pct", "server CPU", "pct", chart=False)
            add(key, label, "loss_frac", "loss", "loss", chart=False)
    raw_pg = {"baseline_target": RAW_PG, "baseline_scenario": "notify"}
    for writers in plan.ingest_writers:
        key, label = f"ingest-{writers}", f"ingest, {writers:,} writer sockets"
        goal = 0.7 if writers == 100 else None
        seen = "NOTIFY/s seen by LISTEN"
        add(key, label, "seen_per_s", seen, "rate", better="higher", goal=goal, **raw_pg)
        add(key, label, "seen_per_s", "NOTIFY/s, against the raw gateway", "rate", better="higher")
        add(key, label, "loss_frac", "loss", "loss", chart=False, **raw_pg)
    for rate in plan.latency_rates:
        key = f"latency-{rate}"
        label = f"latency, {rate:,} msg/s to {plan.latency_readers} readers"
        for quantile in ("p50", "p95", "p99"):
            goal = 2.0 if quantile == "p99" and rate == 1000 else None
            add(key, label, f"{quantile}_ms", f"{quantile} ms", "ms", better="lower", goal=goal)
    notify = {"baseline_target": RAW_PG, "baseline_scenario": "sql-notify"}
    for batch in plan.sql_batches:
        key = sql_key(batch)
        call = "pgws.send" if batch == 1 else f"pgws.send_many of {batch}"
        label = f"SQL producer {call}, no gateway"
        committed = "messages/s committed"
        add(key, label, "messages_per_s", committed, "rate", better="higher", **notify)
        if batch > 1:
            goal = 10.0 if batch == 100 else None
            add(
                key,
                label,
                "messages_per_s",
                "messages/s, against pgws.send",
                "rate",
                better="higher",
                goal=goal,
                baseline_target=target,
                baseline_scenario=sql_key(1),
            )
    same = {"baseline_target": target}  # durable rows: against the same server, not durable
    for writers in plan.durable_ingest_writers:
        key, label = f"durable-ingest-{writers}", f"durable ingest, {writers:,} writer sockets"
        stored = "stored msg/s, against non-durable NOTIFY/s"
        add(key, label, "seen_per_s", stored, "rate", better="higher", goal=1.0, **same,
            baseline_scenario=f"ingest-{writers}")  # fmt: skip
        add(key, label, "loss_frac", "loss", "loss", chart=False, **same,
            baseline_scenario=f"ingest-{writers}")  # fmt: skip
    for readers in plan.durable_fanout_readers:
        key = f"durable-fanout-{readers}"
        label = f"durable fan-out, {readers:,} readers, pgws.send producer"
        add(key, label, "delivered_per_s", "delivered msg/s, against NOTIFY fan-out", "rate",
            better="higher", **same, baseline_scenario=fanout_key(readers, 1))  # fmt: skip
        add(key, label, "loss_frac", "loss", "loss", chart=False, **same,
            baseline_scenario=fanout_key(readers, 1))  # fmt: skip
    for rate in plan.durable_latency_rates:
        key = f"durable-latency-{rate}"
        label = f"durable latency, {rate:,} msg/s to {plan.latency_readers} readers"
        for quantile in ("p50", "p99"):
            add(key, label, f"{quantile}_ms", f"{quantile} ms, against non-durable", "ms",
                better="lower", **same, baseline_scenario=f"latency-{rate}")  # fmt: skip
        # Not delivered by the end of the drain: a writer socket that outruns its stores.
        add(key, label, "loss_frac", "loss", "loss", chart=False, **same,
            baseline_scenario=f"latency-{rate}")  # fmt: skip
    for readers in plan.fanout_readers:  # pgws.v2 (SPEC 8): against legacy, same server and run
        key, label = f"v2-fanout-{readers}", f"v2 fan-out, {readers:,} pgws.v2 readers"
        legacy = {"baseline_target": target, "baseline_scenario": fanout_key(readers, 1)}
        add(key, label, "delivered_per_s", "delivered msg/s, against legacy fan-out", "rate",
            better="higher", goal=0.9, **legacy)  # fmt: skip
        add(key, label, "loss_frac", "loss", "loss", chart=False, **legacy)
        add(key, label, "frame_overhead_bytes", "`msg` frame bytes beyond the legacy frame",
            "bytes", chart=False, **legacy)  # fmt: skip
    label = "idle sockets"
    for step in plan.connection_steps:
        metric_label = f"server RSS MiB, {step:,} sockets"
        add("connections", label, f"rss_mib_{step}", metric_label, "mib", better="lower")
    kib, handshakes = "KiB per idle socket", "handshakes/s (token checked)"
    add("connections", label, "kib_per_socket", kib, "kib", better="lower", goal=1.3)
    add("connections", label, "handshakes_per_s", handshakes, "rate", better="higher", goal=0.7)
    return rows


# --- machine -----------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """What this ran on."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("websockets", "psycopg", "psycopg-binary", "uvloop", "orjson", "python-jose"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=10,
    ).stdout.strip()
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "cpus_allowed": sorted(os.sched_getaffinity(0)),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": versions,
        "commit": commit,
        "hostname": platform.node(),
    }


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages."""
    return os.getloadavg()


def placement_from(args: argparse.Namespace) -> tuple[Placement, list[str]]:
    """Choose CPUs: server on the first allowed one, load generator and PostgreSQL on the next."""
    notes: list[str] = []
    allowed = sorted(os.sched_getaffinity(0))

    def parse(text: str | None) -> tuple[int, ...] | None:
        if text is None or text == "any":
            return None
        return tuple(int(part) for part in text.split(","))

    if args.no_pin or shutil.which("taskset") is None:
        if not args.no_pin:
            notes.append("taskset not found: nothing is pinned")
        return Placement(None, None, None), notes
    if len(allowed) < 2 and args.server_cpus is None:
        notes.append(f"only {len(allowed)} CPU allowed: nothing is pinned")
        return Placement(None, None, None), notes
    server = parse(args.server_cpus) if args.server_cpus else (allowed[0],)
    loadgen = parse(args.loadgen_cpus) if args.loadgen_cpus else (allowed[1],)
    postgres = loadgen if args.pg_cpus == "loadgen" else parse(args.pg_cpus)
    return Placement(server, loadgen, postgres), notes


def pin_postgres(postmaster: int | None, cpus: tuple[int, ...] | None) -> None:
    """Pin the postmaster and its processes; backends forked later inherit it."""
    if cpus is None:
        return
    for process in process_tree(postmaster):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            process.cpu_affinity(list(cpus))


def busy_warnings(
    runs: Sequence[dict[str, Any]], before: Sequence[float], idle_check: float, cpus: int
) -> list[str]:
    """Say when the machine was busy with something else, or the load generator was the limit.

    The load average lags by minutes (it still counts a benchmark that has just ended), so the
    CPU use sampled just before the start is printed beside it.
    """
    notes = []
    if before[0] > BUSY_LOAD * cpus:
        notes.append(
            f"the machine looked busy before the run: load average {before[0]:.2f} on {cpus} "
            f"CPUs ({idle_check:.0f}% of all CPUs in use in the second before the start)"
        )
    measured = [run for run in runs if "metrics" in run and "other_cpu_pct" in run["metrics"]]
    noisy = [run for run in measured if run["metrics"]["other_cpu_pct"] > BUSY_OTHER_PCT]
    if noisy:
        worst = max(run["metrics"]["other_cpu_pct"] for run in noisy)
        notes.append(
            f"{len(noisy)} of {len(measured)} measurements had other processes using more than "
            f"{BUSY_OTHER_PCT:.0f}% of a core (worst {worst:.0f}%): those figures are noisy"
        )
    waiting = [run for run in measured if run["metrics"].get("server_wait_pct", 0) > BUSY_WAIT_PCT]
    if waiting:
        worst = max(run["metrics"]["server_wait_pct"] for run in waiting)
        notes.append(
            f"in {len(waiting)} of {len(measured)} measurements the server waited for its CPU "
            f"more than {BUSY_WAIT_PCT:.0f}% of the time (worst {worst:.0f}%): something else "
            "ran on its core, so its figures there are low"
        )
    steal = [run for run in measured if run["metrics"].get("steal_pct", 0) > 5]
    if steal:
        notes.append(f"{len(steal)} measurements saw CPU steal above 5% (a busy VM host)")

    def loadgen_busy(run: dict[str, Any]) -> float:
        metrics = run["metrics"]
        return float(metrics.get("loadgen_cpu_pct", 0) + metrics.get("loadgen_wait_pct", 0))

    bound = [
        f"{run['target']} {run['scenario']} ({loadgen_busy(run):.0f}%)"
        for run in measured
        if loadgen_busy(run) > LOADGEN_LIMIT_PCT
    ]
    if bound:
        notes.append(
            f"the load generator was running or waiting for its core (shared with PostgreSQL "
            f"and whatever else runs) more than {LOADGEN_LIMIT_PCT:.0f}% of the time in "
            f"{len(bound)} measurements, so it may have been the limit there: "
            + ", ".join(bound[:8])
            + (" …" if len(bound) > 8 else "")
        )
    errors = [run for run in runs if run.get("error")]
    if errors:
        notes.append(
            f"{len(errors)} runs failed: "
            + "; ".join(f"{run['target']} {run['scenario']}: {run['error']}" for run in errors[:5])
        )
    return notes


# --- output ------------------------------------------------------------------------------------


def write_results(
    *,
    out: Path,
    bench: Bench,
    target: Target,
    machine: dict[str, Any],
    notes: list[str],
    command: str,
    started: datetime.datetime,
    load_before: Sequence[float],
    load_after: Sequence[float],
) -> str:
    """Write latest.md, latest.json and latest.png; return the markdown."""
    summary = report.aggregate(bench.runs)
    rows = table_rows(bench.plan, target.name)
    when = started.strftime("%Y-%m-%d %H:%M UTC")
    machine_line = (
        f"{machine['cpu_model']}, {machine['cpus']} CPUs, {machine['memory_gib']} GiB, "
        f"Linux {machine['kernel']}, Python {machine['python']}, "
        + ", ".join(f"{name} {version}" for name, version in machine["packages"].items())
    )
    plan = bench.plan
    pg = machine.get("postgres", {})
    lines = [
        f"# pgws benchmark: {when}",
        "",
        f"- command: `{command}`",
        f"- server under test: `{shlex.join(repo_relative(target.command))}` "
        f"(commit {machine['commit']})",
        f"- baselines: {BASELINE} = `python -m bench.raw_gateway` (LISTEN → orjson → "
        f"broadcast), {RAW_PG} = pipelined psycopg NOTIFY, {plan.notify_connections} connections",
        f"- machine: {machine_line}",
        f"- PostgreSQL {pg.get('version', '?')}"
        + (" (throwaway cluster)" if bench.postmaster else " (--db-uri)")
        + ": "
        + ", ".join(f"{name}={pg.get(name, '?')}" for name in DURABILITY)
        + ("" if pg.get("fsync") == "off" else " (**fsync on**: commits reach the disk)"),
        f"- placement: {bench.placement.describe()}",
        f"- load average before {fmt_load(load_before)}, after {fmt_load(load_after)}",
        f"- {plan.reps} runs of each; {plan.warmup:g} s warm-up, {plan.duration:g} s measured; "
        "cells are median ±half the min-max range",
        "",
    ]
    if notes:
        lines += ["**Warnings**", "", *(f"- {note}" for note in notes), ""]
    lines += [
        report.table(rows, summary, target.name),
        "",
        "Ratio = server under test / baseline (medians); ✓/✗ against the issue's goal.",
        "",
        "CPU during the measured windows, median % of one core (waited: runnable but not running):",
        "",
        report.diagnostics(summary),
        "",
    ]
    markdown = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.md").write_text(markdown)
    charted = report.chart(
        rows,
        summary,
        target.name,
        out / "latest.png",
        f"{target.name} vs baselines, {when}, {machine['cpu_model']} x{machine['cpus']}",
    )
    if not charted:
        (out / "latest.png").unlink(missing_ok=True)
    document = {
        "started": started.isoformat(),
        "command": command,
        "target": {**dataclasses.asdict(target), "command": repo_relative(target.command)},
        "machine": machine,
        "placement": dataclasses.asdict(bench.placement),
        "plan": dataclasses.asdict(bench.plan),
        "load_average": {"before": list(load_before), "after": list(load_after)},
        "warnings": notes,
        "rows": report.rows_json(rows, summary, target.name),
        "summary": report.summary_json(summary),
        "runs": bench.runs,
    }
    (out / "latest.json").write_text(json.dumps(document, indent=1, default=str) + "\n")
    return markdown


def fmt_load(values: Sequence[float]) -> str:
    """Load averages as `0.12 / 0.30 / 0.25`."""
    return " / ".join(f"{value:.2f}" for value in values)


def update_readme(markdown: str) -> None:
    """Replace the block between the markers in bench/README.md with the latest results."""
    path = REPO / "bench" / "README.md"
    start, end = "<!-- latest-results:start -->", "<!-- latest-results:end -->"
    text = path.read_text()
    if start not in text or end not in text:
        print(f"note: {path} has no results markers; not updated")
        return
    head, _, rest = text.partition(start)
    _, _, foot = rest.partition(end)
    body = markdown.replace("# pgws benchmark:", "Latest run:", 1)
    path.write_text(f"{head}{start}\n{body}\n{end}{foot}")


# --- entry point -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer, shorter runs (~2 minutes)")
    parser.add_argument("--reps", type=int, help="runs of each scenario (median and spread)")
    parser.add_argument("--duration", type=float, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, help="seconds of load before measuring")
    parser.add_argument(
        "--only", help=f"comma-separated scenario kinds, from: {', '.join(SCENARIO_KINDS)}"
    )
    parser.add_argument("--fanout-readers", help="comma-separated, e.g. 100,1000,5000")
    parser.add_argument(
        "--fanout-per-transaction", help="producer NOTIFYs per transaction, e.g. 1,10"
    )
    parser.add_argument("--ingest-writers", help="comma-separated, e.g. 10,100")
    parser.add_argument("--latency-rates", help="comma-separated msg/s, e.g. 100,1000")
    parser.add_argument("--latency-readers", type=int, help="readers in latency (default 100)")
    parser.add_argument("--connection-steps", help="comma-separated, e.g. 1000,5000,10000")
    parser.add_argument("--notify-connections", type=int, help="raw psycopg NOTIFY connections")
    parser.add_argument("--sql-batches", help="SQL producer payloads per call, e.g. 1,10,100")
    parser.add_argument("--durable-ingest-writers", help="durable kind: e.g. 100")
    parser.add_argument("--durable-fanout-readers", help="durable kind: e.g. 1000")
    parser.add_argument("--durable-latency-rates", help="durable kind: msg/s, e.g. 100,1000")
    parser.add_argument(
        "--server-cmd", default=f"{sys.executable} -m pgws serve", help="the server under test"
    )
    parser.add_argument("--server-name", default="pgws")
    parser.add_argument(
        "--server-env", action="append", default=[], metavar="KEY=VALUE", help="repeatable"
    )
    parser.add_argument(
        "--baseline-cmd",
        default=f"{sys.executable} -m bench.raw_gateway",
        help="the raw gateway (add --send-loop to try that variant)",
    )
    parser.add_argument(
        "--no-baseline", action="store_true", help="measure the server under test only"
    )
    parser.add_argument(
        "--baseline-only", action="store_true", help="measure the baselines only (no pgws)"
    )
    parser.add_argument("--pool-size", type=int, default=10, help="PGWS_POOL_SIZE")
    parser.add_argument("--server-cpus", help="e.g. 0 or 0,1 (default: the first allowed CPU)")
    parser.add_argument("--loadgen-cpus", help="default: the second allowed CPU")
    parser.add_argument(
        "--pg-cpus", default="loadgen", help="'loadgen' (default), 'any' or a list such as 1"
    )
    parser.add_argument("--no-pin", action="store_true", help="pin nothing")
    parser.add_argument("--db-uri", help="use this PostgreSQL instead of a throwaway one")
    parser.add_argument(
        "--fsync-on",
        action="store_true",
        help="throwaway cluster with fsync, synchronous_commit and full_page_writes on",
    )
    parser.add_argument(
        "--pg-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting of the throwaway cluster (repeatable)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="where latest.* go")
    parser.add_argument("--readme", action="store_true", help="copy the table into the README")
    parser.add_argument(
        "--wait-lock",
        type=float,
        default=900.0,
        help="seconds to wait for another benchmark run on this machine to finish",
    )
    return parser.parse_args(argv)


def plan_from(args: argparse.Namespace) -> Plan:
    """The plan: FULL or QUICK, then the options on top."""
    plan = QUICK if args.quick else FULL

    def numbers(text: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
        return default if text is None else tuple(int(part) for part in text.split(","))

    kinds = plan.kinds
    if args.only:
        kinds = tuple(kind for kind in SCENARIO_KINDS if kind in args.only.split(","))
        unknown = set(args.only.split(",")) - set(SCENARIO_KINDS)
        if unknown:
            raise SystemExit(f"--only: unknown scenario kinds: {', '.join(sorted(unknown))}")
    return dataclasses.replace(
        plan,
        reps=args.reps or plan.reps,
        duration=args.duration or plan.duration,
        warmup=args.warmup if args.warmup is not None else plan.warmup,
        fanout_readers=numbers(args.fanout_readers, plan.fanout_readers),
        fanout_per_transaction=numbers(args.fanout_per_transaction, plan.fanout_per_transaction),
        ingest_writers=numbers(args.ingest_writers, plan.ingest_writers),
        latency_rates=numbers(args.latency_rates, plan.latency_rates),
        latency_readers=args.latency_readers or plan.latency_readers,
        connection_steps=numbers(args.connection_steps, plan.connection_steps),
        notify_connections=args.notify_connections or plan.notify_connections,
        sql_batches=numbers(args.sql_batches, plan.sql_batches),
        durable_ingest_writers=numbers(args.durable_ingest_writers, plan.durable_ingest_writers),
        durable_fanout_readers=numbers(args.durable_fanout_readers, plan.durable_fanout_readers),
        durable_latency_rates=numbers(args.durable_latency_rates, plan.durable_latency_rates),
        kinds=kinds if not args.no_baseline else tuple(k for k in kinds if k != "notify"),
    )


@contextlib.contextmanager
def exclusive(path: Path, within: float) -> Iterator[None]:
    """Hold a machine-wide lock, so two benchmark runs never share the cores they measure."""
    with path.open("a") as handle:
        deadline = time.monotonic() + within
        told = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    message = f"another benchmark still holds {path} after {within:.0f} s"
                    raise SystemExit(message) from None
                if not told:
                    print(f"waiting up to {within:.0f} s for another benchmark run ({path})")
                    told = True
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def database(uri: str | None, settings: dict[str, str]) -> Iterator[tuple[str, int | None]]:
    """The PostgreSQL to use: a given URI (no CPU accounting), or a throwaway cluster."""
    if uri:
        yield uri, None
        return
    from dev.devdb import DEFAULT_SETTINGS, ThrowawayPostgres

    with ThrowawayPostgres(settings={**DEFAULT_SETTINGS, **settings}) as postgres:
        yield postgres.uri, postgres.postmaster_pid()


DURABILITY = ("fsync", "synchronous_commit", "full_page_writes")


def postgres_settings(uri: str) -> dict[str, str]:
    """The server's version and the settings that decide what a commit costs, as it runs."""
    import psycopg

    with psycopg.connect(uri, connect_timeout=10) as conn:
        shown = {"version": str(conn.execute("SHOW server_version").fetchone()[0])}  # type: ignore[index]
        for name in DURABILITY:
            shown[name] = str(conn.execute(f"SHOW {name}").fetchone()[0])  # type: ignore[index]
    return shown


def pg_settings_from(args: argparse.Namespace) -> dict[str, str]:
    """--pg-setting NAME=VALUE pairs, and --fsync-on's three."""
    settings = {name: "on" for name in DURABILITY} if args.fsync_on else {}
    for item in args.pg_setting:
        name, _, value = item.partition("=")
        settings[name] = value
    return settings


async def main_async(args: argparse.Namespace, command: str) -> int:
    """Run the suite and write the results; the exit status says whether every run worked."""
    plan = plan_from(args)
    placement, notes = placement_from(args)
    under_test = Target(args.server_name, tuple(shlex.split(args.server_cmd)))
    baseline = Target(BASELINE, tuple(shlex.split(args.baseline_cmd)))
    targets = [under_test, baseline]
    if args.no_baseline:
        targets = [under_test]
    if args.baseline_only:
        targets = [baseline]
    biggest = max([*plan.connection_steps, *plan.fanout_readers, 0])
    raise_nofile_limit(biggest + 4096)  # the children inherit it
    reported = baseline if args.baseline_only else under_test
    with exclusive(LOCK_FILE, args.wait_lock):
        return await measure(args, command, plan, placement, notes, targets, reported)


async def measure(
    args: argparse.Namespace,
    command: str,
    plan: Plan,
    placement: Placement,
    notes: list[str],
    targets: list[Target],
    reported: Target,
) -> int:
    """Everything that must not overlap another run: measure, then write the results."""
    started = datetime.datetime.now(datetime.UTC)
    raw_dir = args.out / "raw" / started.strftime("%Y%m%d-%H%M%S")
    raw_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    load_before = load_average()
    idle_check = psutil.cpu_percent(interval=1.0)
    print(f"machine: {machine['cpu_model']} x{machine['cpus']}; load {fmt_load(load_before)}")
    print(f"placement: {placement.describe()}; logs in {raw_dir}")
    with database(args.db_uri, pg_settings_from(args)) as (db_uri, postmaster):
        machine["postgres"] = postgres_settings(db_uri)
        pin_postgres(postmaster, placement.postgres)
        bench = Bench(
            db_uri=db_uri,
            postmaster=postmaster,
            placement=placement,
            plan=plan,
            raw_dir=raw_dir,
            pool_size=args.pool_size,
            server_env=dict(item.split("=", 1) for item in args.server_env),
        )
        try:
            await run_suite(bench, targets)
        finally:
            (raw_dir / "runs.json").write_text(json.dumps(bench.runs, indent=1, default=str))
    load_after = load_average()
    notes += busy_warnings(bench.runs, load_before, idle_check, machine["cpus"] or 1)
    markdown = write_results(
        out=args.out,
        bench=bench,
        target=reported,
        machine=machine,
        notes=notes,
        command=command,
        started=started,
        load_before=load_before,
        load_after=load_after,
    )
    if args.readme:
        update_readme(markdown)
    print()
    print(markdown)
    print(f"written: {args.out / 'latest.md'}, latest.json, latest.png")
    return 1 if any(run.get("error") for run in bench.runs) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run, and make sure no child outlives us whatever happens."""
    args = parse_args(argv)
    command = shlex.join(["python", "-m", "bench.run", *(argv or sys.argv[1:])])

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    # Ctrl-C works even when started from a shell that ignores SIGINT in background jobs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return asyncio.run(main_async(args, command))
    except KeyboardInterrupt:
        print("interrupted: stopping every process we started", file=sys.stderr)
        return 130
    finally:
        kill_groups()


if __name__ == "__main__":
    raise SystemExit(main())
