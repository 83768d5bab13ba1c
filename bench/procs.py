"""Child processes and their CPU, run-queue wait and memory, for the benchmark runner.

Every child runs in its own process group, so that stopping it stops whatever it forked too
(`pgws serve --workers N`), and is remembered until reaped, so that `kill_groups()` can end
whatever is left if the runner itself is interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import psutil

REPO = Path(__file__).resolve().parent.parent

_GROUPS: set[int] = set()  # process groups we started and have not reaped yet


def kill_groups() -> None:
    """Last resort: SIGKILL every process group started here and not reaped yet."""
    for pgid in list(_GROUPS):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        _GROUPS.discard(pgid)


def pinned(cpus: tuple[int, ...] | None, command: Sequence[str]) -> list[str]:
    """Prefix `command` with taskset when pinning is asked for."""
    if cpus is None:
        return list(command)
    return ["taskset", "-c", ",".join(map(str, cpus)), *command]


async def spawn(
    command: Sequence[str], *, env: dict[str, str] | None, log: IO[bytes], stdio: bool = False
) -> asyncio.subprocess.Process:
    """Start a child in its own process group (so the whole tree can be stopped)."""
    pipe = asyncio.subprocess.PIPE if stdio else asyncio.subprocess.DEVNULL
    process = await asyncio.create_subprocess_exec(
        *command,
        stdin=pipe,
        stdout=pipe if stdio else log,
        stderr=log,
        env=env,
        cwd=REPO,
        start_new_session=True,
    )
    _GROUPS.add(process.pid)
    return process


async def stop(process: asyncio.subprocess.Process, grace: float = 10.0) -> int | None:
    """SIGTERM the process group, SIGKILL it after `grace` seconds; return the exit status.

    None means it had to be killed.
    """
    status: int | None = process.returncode
    try:
        if status is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                async with asyncio.timeout(grace):
                    status = await process.wait()
            except TimeoutError:
                status = None
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # stragglers (workers), and the timed-out
        if process.returncode is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await process.wait()
        _GROUPS.discard(process.pid)
    return status


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def process_tree(pid: int | None) -> list[psutil.Process]:
    """A process and all its descendants (empty if it is gone)."""
    if pid is None:
        return []
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def cpu_by_pid(pid: int | None) -> dict[int, float]:
    """CPU seconds (user + system) of each process in a tree."""
    result = {}
    for process in process_tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            times = process.cpu_times()
            result[process.pid] = times.user + times.system
    return result


def runqueue_wait(pid: int | None) -> float:
    """Seconds the threads of a process tree spent runnable but waiting for a CPU.

    From /proc/<pid>/task/<tid>/schedstat (second field, ns): on a pinned process this is
    time taken by someone else on its core, the most direct sign of a busy machine.
    """
    total = 0
    for process in process_tree(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            for task in Path(f"/proc/{process.pid}/task").iterdir():
                total += int((task / "schedstat").read_text().split()[1])
    return total / 1e9


def rss_bytes(pid: int | None) -> int:
    """Resident memory of a process tree."""
    total = 0
    for process in process_tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += process.memory_info().rss
    return total


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """CPU counters at one instant."""

    wall: float
    server: dict[int, float]
    postgres: dict[int, float]
    loadgen: dict[int, float]
    runner: float
    busy: float  # user + nice + system over all CPUs (irq and softirq left out)
    steal: float
    server_wait: float
    loadgen_wait: float


class Sampler:
    """Takes snapshots of the processes of one run and turns two of them into CPU shares."""

    def __init__(self, server: int | None, postgres: int | None, loadgen: int | None) -> None:
        self.pids = (server, postgres, loadgen)

    def snapshot(self) -> Snapshot:
        """Read every counter now."""
        server, postgres, loadgen = self.pids
        system = psutil.cpu_times()
        runner = psutil.Process().cpu_times()
        return Snapshot(
            wall=time.perf_counter(),
            server=cpu_by_pid(server),
            postgres=cpu_by_pid(postgres),
            loadgen=cpu_by_pid(loadgen),
            runner=runner.user + runner.system,
            busy=system.user + system.nice + system.system,
            steal=getattr(system, "steal", 0.0),
            server_wait=runqueue_wait(server),
            loadgen_wait=runqueue_wait(loadgen),
        )

    @staticmethod
    def shares(windows: Sequence[tuple[Snapshot, Snapshot]]) -> dict[str, float]:
        """CPU used within the windows, in % of one core, per party."""

        def used(before: dict[int, float], after: dict[int, float]) -> float:
            return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())

        wall = server = postgres = loadgen = runner = busy = steal = 0.0
        server_wait = loadgen_wait = 0.0
        for start, end in windows:
            wall += end.wall - start.wall
            server += used(start.server, end.server)
            postgres += used(start.postgres, end.postgres)
            loadgen += used(start.loadgen, end.loadgen)
            runner += end.runner - start.runner
            busy += end.busy - start.busy
            steal += end.steal - start.steal
            server_wait += end.server_wait - start.server_wait
            loadgen_wait += end.loadgen_wait - start.loadgen_wait
        ours = server + postgres + loadgen + runner
        return {
            "server_cpu_pct": 100 * server / wall,
            "pg_cpu_pct": 100 * postgres / wall,
            "loadgen_cpu_pct": 100 * loadgen / wall,
            "other_cpu_pct": max(0.0, 100 * (busy - ours) / wall),
            "steal_pct": 100 * steal / wall,
            "server_wait_pct": 100 * server_wait / wall,
            "loadgen_wait_pct": 100 * loadgen_wait / wall,
        }
