"""`pgws serve --workers N`: N gateway processes sharing one port, supervised by this one.

Each worker is a plain `pgws serve` with its own LISTEN connection and pool; the kernel spreads
new connections across them (SO_REUSEPORT), and PostgreSQL, the bus, carries messages between
them. The parent holds the port, restarts a worker that dies, reports readiness to systemd once
every worker is ready (each reports to a notify socket of the parent's), and on SIGTERM stops all.

Workers die with the supervisor even when it is SIGKILLed (else they would keep serving as orphans
and share the port with the next instance): on Linux each asks the kernel for SIGTERM when its
parent dies (PR_SET_PDEATHSIG), and everywhere each watches a pipe whose write end only the
supervisor holds, whose EOF means the same. Either way the worker stops as on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import secrets
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import structlog

from pgws.config import Config
from pgws.errors import ConfigError
from pgws.net import listen_socket
from pgws.signals import IGNORED_SIGNALS, STOP_SIGNALS, log_ignored_signal
from pgws.systemd import SystemdNotifier

log = structlog.get_logger("pgws.workers")

WORKER_ID = "PGWS_WORKER_ID"  # set in a worker's environment: bind with SO_REUSEPORT, log the id
SUPERVISOR_PID = "PGWS_SUPERVISOR_PID"  # a worker's expected parent
PARENT_PIPE = "PGWS_PARENT_PIPE"  # a worker's fd of the pipe whose EOF means the supervisor is gone
# The abstract Unix socket name the workers elect their LISTEN holder on (pgws.shared_listener).
SHARED_LISTENER_NAME = "PGWS_SHARED_LISTENER_NAME"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# A worker that dies this soon after starting, this many times in a row, is not restarted again.
_QUICK_DEATH = 2.0
_MAX_QUICK_DEATHS = 5


class Worker:
    """One child process and the datagram socket it reports READY=1 on."""

    def __init__(self, index: int, folder: Path) -> None:
        self.index = index
        self.address = str(folder / f"worker-{index}.sock")
        self.inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.inbox.bind(self.address)
        self.inbox.setblocking(False)
        self.process: asyncio.subprocess.Process | None = None
        self.ready = asyncio.Event()
        self.quick_deaths = 0
        self.started_at = 0.0

    async def start(
        self, env: Mapping[str, str], parent_pipe: int, args: Sequence[str] = ()
    ) -> None:
        """Start (or restart) the process, `pgws serve ARGS`; it inherits `parent_pipe` (read end)
        and no other fd."""
        self.ready.clear()
        self.started_at = time.monotonic()
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pgws",
            "serve",
            *args,
            env={
                **env,
                WORKER_ID: str(self.index),
                "NOTIFY_SOCKET": self.address,
                SUPERVISOR_PID: str(os.getpid()),
                PARENT_PIPE: str(parent_pipe),
            },
            stdin=asyncio.subprocess.DEVNULL,
            pass_fds=(parent_pipe,),
        )
        log.info("worker_started", worker=self.index, pid=self.process.pid)

    async def watch_ready_forever(self) -> None:
        """Set `ready` whenever the process says READY=1."""
        loop = asyncio.get_running_loop()
        while True:
            message = await loop.sock_recv(self.inbox, 4096)
            if b"READY=1" in message.split(b"\n"):
                self.ready.set()


async def supervise(
    config: Config,
    env: Mapping[str, str],
    systemd: SystemdNotifier,
    args: Sequence[str] = (),
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Run `config.workers` workers until SIGTERM/SIGINT/SIGQUIT; return the exit status.

    Each worker runs `pgws serve ARGS` in `env`; SIGHUP is passed on to every worker, which
    reloads by itself.
    """
    # Hold the port for the whole run: with PGWS_PORT=0 this also fixes the port the workers share.
    holder = listen_socket(config.host, config.port, reuse_port=True)
    port = holder.getsockname()[1]
    child_env = {
        key: value for key, value in env.items() if key not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")
    }
    child_env.update({"PGWS_PORT": str(port), "PGWS_WORKERS": "1"})
    if config.shared_listener and sys.platform == "linux":  # abstract socket names are Linux's
        child_env[SHARED_LISTENER_NAME] = f"pgws-{os.getpid()}-{secrets.token_hex(8)}-listener"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    for sig in IGNORED_SIGNALS:
        loop.add_signal_handler(sig, log_ignored_signal, sig)
    status = 0
    # Only this process ever holds the write end (os.pipe fds are not inherited): when it dies,
    # however it dies, every worker reads EOF.
    parent_pipe, write_end = os.pipe()
    with tempfile.TemporaryDirectory(prefix="pgws-workers-") as folder:
        workers = [Worker(index, Path(folder)) for index in range(config.workers)]
        loop.add_signal_handler(signal.SIGHUP, _forward, workers, signal.SIGHUP)
        try:
            async with asyncio.TaskGroup() as tasks:
                background = [
                    tasks.create_task(worker.watch_ready_forever(), name=f"ready-{worker.index}")
                    for worker in workers
                ]
                for worker in workers:
                    await worker.start(child_env, parent_pipe, args)
                background.append(
                    tasks.create_task(_report_ready(workers, systemd, port, on_ready), name="ready")
                )
                status = await _keep_running(workers, child_env, parent_pipe, args, stop)
                systemd.notify("STOPPING=1")
                await _stop_all(workers, config.shutdown_timeout)
                for task in background:
                    task.cancel()
        finally:
            for worker in workers:
                if worker.process is not None and worker.process.returncode is None:
                    worker.process.kill()
                worker.inbox.close()
            holder.close()
            os.close(parent_pipe)
            os.close(write_end)
    log.info("workers_stopped", status=status)
    return status


async def _report_ready(
    workers: list[Worker],
    systemd: SystemdNotifier,
    port: int,
    on_ready: Callable[[], None] | None,
) -> None:
    await asyncio.gather(*(worker.ready.wait() for worker in workers))
    log.info("workers_ready", count=len(workers), port=port)
    systemd.notify("READY=1")
    if on_ready is not None:
        on_ready()
    await systemd.watchdog_forever()


async def _keep_running(
    workers: list[Worker],
    env: Mapping[str, str],
    parent_pipe: int,
    args: Sequence[str],
    stop: asyncio.Event,
) -> int:
    """Restart workers that die until `stop`; return 78 if one reports a configuration error."""
    stopping = asyncio.create_task(stop.wait())
    try:
        while True:
            waits = {
                asyncio.ensure_future(worker.process.wait()): worker
                for worker in workers
                if worker.process is not None
            }
            done, _ = await asyncio.wait({stopping, *waits}, return_when=asyncio.FIRST_COMPLETED)
            for waiting in waits:
                if waiting not in done:
                    waiting.cancel()
            if stopping in done:
                return 0
            for finished in done:
                worker = waits[finished]
                code = finished.result()
                if code == ConfigError.exit_code:
                    log.error("worker_config_error", worker=worker.index)
                    stop.set()
                    return code
                quick = time.monotonic() - worker.started_at < _QUICK_DEATH
                worker.quick_deaths = worker.quick_deaths + 1 if quick else 0
                if worker.quick_deaths >= _MAX_QUICK_DEATHS:
                    log.error("worker_crash_loop", worker=worker.index, code=code)
                    stop.set()
                    return 1
                log.warning("worker_died", worker=worker.index, code=code, action="restart")
                await asyncio.sleep(min(0.1 * 2**worker.quick_deaths, 5.0))
                await worker.start(env, parent_pipe, args)
    finally:
        stopping.cancel()


def _forward(workers: list[Worker], sig: signal.Signals) -> None:
    """Pass a signal on to every running worker (SIGHUP: each one reloads its own settings)."""
    for worker in workers:
        if worker.process is not None and worker.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(sig)
    log.info("signal_forwarded", signal=sig.name, workers=len(workers))


async def _stop_all(workers: list[Worker], shutdown_timeout: float) -> None:
    """SIGTERM every worker; SIGKILL those still running after their own shutdown budget."""
    running = [w.process for w in workers if w.process is not None and w.process.returncode is None]
    for process in running:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(shutdown_timeout + 2.0):
            await asyncio.gather(*(process.wait() for process in running))
    except TimeoutError:
        for process in running:
            if process.returncode is None:
                log.error("worker_killed", pid=process.pid)
                process.kill()


def worker_id(env: Mapping[str, str]) -> int | None:
    """This process's worker number when it runs under a supervisor, else None."""
    value = env.get(WORKER_ID, "")
    return int(value) if value.isdigit() else None


def bind_to_supervisor(env: Mapping[str, str]) -> None:
    """In a worker: on Linux, have the kernel send SIGTERM when the supervisor dies.

    The supervisor may already be gone (killed between our fork and this call), and then the
    signal will never come: the parent is checked again afterwards, and the worker leaves now.
    """
    expected = env.get(SUPERVISOR_PID, "")
    if not expected.isdigit():
        return
    if sys.platform == "linux":
        _set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != int(expected):
        log.warning("supervisor_gone", supervisor=int(expected), action="exit")
        sys.exit(0)


def _set_parent_death_signal(sig: signal.Signals) -> None:
    # The signal comes when the thread that forked us ends: the supervisor forks from its main
    # thread (the event loop's), which lives as long as the process.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(sig), 0, 0, 0) != 0:
        log.warning("parent_death_signal_failed", error=os.strerror(ctypes.get_errno()))


def shared_listener_name(env: Mapping[str, str]) -> str | None:
    """In a worker whose siblings share one LISTEN connection: the name they elect it on."""
    return env.get(SHARED_LISTENER_NAME) or None


def parent_pipe(env: Mapping[str, str]) -> int | None:
    """In a worker: the fd whose EOF means the supervisor is gone (None outside a supervisor)."""
    value = env.get(PARENT_PIPE, "")
    if not value.isdigit():
        return None
    try:
        os.fstat(int(value))
    except OSError:
        return None
    return int(value)
