"""More than one process: `--workers N` behind one port, and separate gateways on one database."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from typing import Any

from websockets.asyncio.client import connect

from tests.conftest import TIMEOUT, channel_name, make_token, recv_json


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
