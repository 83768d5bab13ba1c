"""More than one process: `--workers N` behind one port, and separate gateways on one database."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import (
    SECRET,
    TIMEOUT,
    ServeProcess,
    channel_name,
    make_token,
    recv_json,
    until,
)


async def next_with_payload(ws: Any, payload: str) -> None:
    """Read (bounded) until a message with `payload` arrives; others' messages are skipped."""
    async with asyncio.timeout(TIMEOUT):
        while (await recv_json(ws))["payload"] != payload:
            pass


async def test_workers_share_the_port_and_messages_cross_between_them(serve_process: Any) -> None:
    """With --workers 2, sockets land on both workers and a message reaches readers on both."""
    serving, port = await serve_process(PGWS_WORKERS="2")
    await serving.wait_for_event("workers_ready")
    chat = channel_name()
    url = f"ws://127.0.0.1:{port}/{chat}/{make_token({'mode': 'rw'})}"
    async with contextlib.AsyncExitStack() as stack:
        sockets = [await stack.enter_async_context(connect(url)) for _ in range(24)]
        served_by = {e["worker"] for e in serving.events if e.get("event") == "client_connected"}
        assert served_by == {0, 1}, "the kernel put every socket on one worker"
        # A socket hearing its own message back proves its worker has subscribed it.
        for index, ws in enumerate(sockets):
            await ws.send(f"ping-{index}")
            await next_with_payload(ws, f"ping-{index}")
        await sockets[0].send("across workers")
        for ws in sockets:
            await next_with_payload(ws, "across workers")
    serving.process.send_signal(signal.SIGTERM)
    assert await serving.wait_exit() == 0


async def test_a_killed_worker_is_restarted(serve_process: Any) -> None:
    """SIGKILL on one worker: the supervisor starts a new one and keeps serving."""
    serving, port = await serve_process(PGWS_WORKERS="2")
    await serving.wait_for_event("workers_ready")
    first = [e for e in serving.events if e.get("event") == "worker_started"]
    victim = first[0]["pid"]
    mark = len(serving.events)
    os.kill(victim, signal.SIGKILL)
    died = await serving.wait_for_event("worker_died", after=mark)
    assert died["worker"] == first[0]["worker"]
    restarted = await serving.wait_for_event("worker_started", after=mark)
    assert restarted["pid"] != victim
    await serving.wait_for_event("server_started", after=mark)
    async with connect(
        f"ws://127.0.0.1:{port}/x/{make_token({'mode': 'r'})}", open_timeout=TIMEOUT
    ):
        pass
    serving.process.send_signal(signal.SIGTERM)
    assert await serving.wait_exit() == 0


async def test_separate_gateways_on_one_database_share_channels(serve_process: Any) -> None:
    """Two `pgws serve` on different ports, same listen channel: PostgreSQL is the bus."""
    shared = channel_name()
    first, first_port = await serve_process(PGWS_LISTEN_CHANNEL=shared, PGWS_META_CHANNEL="meta")
    second, second_port = await serve_process(PGWS_LISTEN_CHANNEL=shared)
    chat = channel_name()
    token = make_token({"mode": "rw"})
    async with (
        connect(f"ws://127.0.0.1:{first_port}/{chat}/{token}") as on_first,
        connect(f"ws://127.0.0.1:{second_port}/{chat}/{token}") as on_second,
    ):
        # Each socket proves its own subscription by hearing its own message first.
        await on_second.send("ping")
        assert (await recv_json(on_second))["payload"] == "ping"
        await on_first.send("from the first gateway")
        assert (await recv_json(on_second))["payload"] == "from the first gateway"
    for serving in (first, second):
        serving.process.send_signal(signal.SIGTERM)
        assert await serving.wait_exit() == 0


async def test_asyncio_loop_by_default_and_uvloop_on_request(serve_process: Any) -> None:
    """`pgws serve` runs on asyncio's loop by default and on uvloop with PGWS_UVLOOP=true."""
    plain, _ = await serve_process()
    fast, _ = await serve_process(PGWS_UVLOOP="true")
    assert plain.events[-1]["event_loop"].startswith("asyncio")
    assert fast.events[-1]["event_loop"].startswith("uvloop")


# --- workers die with their supervisor, however it dies --------------------------------------


def running(pid: int) -> bool:
    """The process exists and has not exited (a zombie waiting to be reaped has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def port_is_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:`port` (SO_REUSEADDR: sockets in TIME_WAIT do not count)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


async def closed_code(ws: ClientConnection) -> int | None:
    """Read (bounded) until the server closes the socket; the close code it sent."""
    async with asyncio.timeout(TIMEOUT):
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.recv()
    return ws.close_code


async def start_worker(dsn: str, pass_fds: tuple[int, ...] = (), **env: str) -> ServeProcess:
    """`pgws serve` started the way the supervisor starts a worker, with these extra settings."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pgws", "serve", "--json-logs",
        env={
            "PATH": os.environ.get("PATH", ""),
            "PGWS_DB_URI": dsn,
            "PGWS_JWT_SECRET": SECRET,
            "PGWS_HOST": "127.0.0.1",
            "PGWS_PORT": "0",
            "PGWS_LISTEN_CHANNEL": channel_name(),
            "PGWS_RETRIES": "1",
            "PGWS_WORKER_ID": "0",
            **env,
        },
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, pass_fds=pass_fds,
    )  # fmt: skip
    return ServeProcess(process)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("uvloop", ["false", "true"])
async def test_workers_of_a_killed_supervisor_close_their_sockets_exit_and_free_the_port(
    serve_process: Any, uvloop: str
) -> None:
    """SIGKILL on the supervisor: each worker closes its sockets with 1001 and exits, and the
    port is free for the next instance (no orphan keeps serving on it)."""
    serving, port = await serve_process(PGWS_WORKERS="2", PGWS_UVLOOP=uvloop)
    await serving.wait_for_event("workers_ready")
    pids = [e["pid"] for e in serving.events if e.get("event") == "worker_started"]
    assert len(pids) == 2
    try:
        url = f"ws://127.0.0.1:{port}/{channel_name()}/{make_token({'mode': 'r'})}"
        async with connect(url, open_timeout=TIMEOUT) as ws:
            serving.process.send_signal(signal.SIGKILL)
            assert await closed_code(ws) == 1001
        await until(lambda: not any(running(pid) for pid in pids), "the workers to exit")
        assert port_is_free(port)
    finally:
        for pid in pids:  # on a failure, leave no orphan behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("uvloop", ["false", "true"])
async def test_a_worker_stops_cleanly_when_its_supervisor_pipe_closes(
    dsn: str, uvloop: str
) -> None:
    """The portable check: EOF on the pipe from the supervisor stops a worker as SIGTERM does
    (its parent here, the test, stays alive: the parent-death signal plays no part)."""
    read_end, write_end = os.pipe()
    worker = await start_worker(
        dsn, (read_end,), PGWS_PARENT_PIPE=str(read_end), PGWS_UVLOOP=uvloop
    )
    os.close(read_end)
    try:
        port = int((await worker.wait_for_event("server_started"))["port"])
        url = f"ws://127.0.0.1:{port}/{channel_name()}/{make_token({'mode': 'r'})}"
        async with connect(url, open_timeout=TIMEOUT) as ws:
            os.close(write_end)
            write_end = -1
            assert await closed_code(ws) == 1001
        assert await worker.wait_exit() == 0
        assert any(e.get("event") == "supervisor_gone" for e in worker.events)
    finally:
        if write_end >= 0:
            os.close(write_end)
        await worker.kill()


# The supervisor's stand-in: starts one worker with itself as the expected parent, says its pid.
_PARENT = """
import os, subprocess, sys
env = {**os.environ, "PGWS_SUPERVISOR_PID": str(os.getpid())}
worker = subprocess.Popen([sys.executable, "-m", "pgws", "serve", "--json-logs"], env=env)
print(worker.pid, flush=True)
worker.wait()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
async def test_a_worker_gets_sigterm_when_its_parent_is_killed(dsn: str) -> None:
    """On Linux, the kernel signals a worker whose parent dies (no pipe involved): it stops
    cleanly and exits."""
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _PARENT,
        env={
            "PATH": os.environ.get("PATH", ""),
            "PGWS_DB_URI": dsn,
            "PGWS_JWT_SECRET": SECRET,
            "PGWS_HOST": "127.0.0.1",
            "PGWS_PORT": "0",
            "PGWS_LISTEN_CHANNEL": channel_name(),
            "PGWS_WORKER_ID": "0",
        },
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    logs = ServeProcess(parent)
    assert parent.stdout is not None
    async with asyncio.timeout(TIMEOUT):
        pid = int(await parent.stdout.readline())
    try:
        await logs.wait_for_event("server_started")
        parent.kill()
        await until(lambda: not running(pid), "the worker to exit")
        await logs.wait_for_event("server_stopped")  # a clean stop, not a kill
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        await logs.kill()


async def test_a_worker_whose_supervisor_is_already_gone_exits_at_once(dsn: str) -> None:
    """Started after its supervisor died (so no signal will come), a worker exits 0 at once."""
    gone = await asyncio.create_subprocess_exec("true")
    await gone.wait()
    worker = await start_worker(dsn, PGWS_SUPERVISOR_PID=str(gone.pid))
    try:
        assert await worker.wait_exit() == 0
        assert [e["event"] for e in worker.events] == ["supervisor_gone"]
    finally:
        await worker.kill()
