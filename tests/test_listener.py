"""The LISTEN connection under real faults: terminated backends and restarted databases (SPEC 4)."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable
from typing import Any, Literal

import psycopg
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from dev.devdb import ThrowawayPostgres
from tests.conftest import (
    TIMEOUT,
    Running,
    StartGateway,
    channel_name,
    make_token,
    recv_json,
    signal_closes_1001_and_exits_0,
    subscribed,
    until,
)

DB = psycopg.AsyncConnection[Any]


async def terminate(db: DB, pid: int) -> None:
    """Kill one backend the way an operator or a failover would."""
    await db.execute("SELECT pg_terminate_backend(%s)", (pid,))


async def listener_pid(db: DB, listen_channel: str) -> int:
    """The backend that LISTENs on `listen_channel`, as the database sees it."""
    cursor = await db.execute(
        "SELECT pid FROM pg_stat_activity WHERE query = %s", (f'LISTEN "{listen_channel}"',)
    )
    row = await cursor.fetchone()
    assert row is not None, "no LISTEN backend"
    return int(row[0])


async def test_terminated_listener_is_replaced_and_open_readers_keep_receiving(
    start_gateway: StartGateway, db: DB
) -> None:
    """With the interval set, a killed LISTEN backend is replaced while sockets stay open."""
    gateway: Running = await start_gateway(check_listener_interval=5.0)
    chat = channel_name()
    listener = gateway.gateway.listener
    async with gateway.connect(f"/{chat}/{make_token({'mode': 'r'})}") as ws:
        await subscribed(gateway, chat)
        old_pid = listener.backend_pid
        assert old_pid is not None
        await terminate(db, old_pid)
        # Noticed at once (closed socket), not after the 5 s interval.
        async with asyncio.timeout(3.0):
            await until(lambda: listener.reconnects == 1, "the listener to reconnect")
        assert listener.backend_pid not in (None, old_pid)
        await gateway.notify(db, {"channel": chat, "payload": "after the fault"})
        assert (await recv_json(ws))["payload"] == "after the fault"


async def test_listener_survives_a_database_restart(
    start_gateway: StartGateway, cluster: ThrowawayPostgres
) -> None:
    """With the interval set, readers receive again after fast and immediate database restarts."""
    gateway: Running = await start_gateway(db_uri=cluster.uri, check_listener_interval=0.5)
    chat = channel_name()
    listener = gateway.gateway.listener
    async with gateway.connect(f"/{chat}/{make_token({'mode': 'rw'})}") as ws:
        await subscribed(gateway, chat)
        modes: tuple[Literal["fast", "immediate"], ...] = ("fast", "immediate")
        for expected, mode in enumerate(modes, start=1):
            await asyncio.to_thread(cluster.restart, mode)
            await until(reconnects_reached(listener, expected), f"reconnect after a {mode} restart")
            await ws.send(f"after {mode} restart")  # through the pool, which heals too
            assert (await recv_json(ws))["payload"] == f"after {mode} restart"


def reconnects_reached(listener: Any, count: int) -> Callable[[], bool]:
    return lambda: bool(listener.reconnects >= count)


async def test_without_interval_a_lost_listener_stops_the_process_non_zero(
    serve_process: Any, db: DB
) -> None:
    """Unset interval: the process closes its sockets with 1001 and exits 69 for its supervisor."""
    serving, port = await serve_process()
    chat = channel_name()
    listen_channel = serving.events[-1]["listen_channel"]
    async with connect(f"ws://127.0.0.1:{port}/{chat}/{make_token({'mode': 'r'})}") as ws:
        await terminate(db, await listener_pid(db, listen_channel))
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(TIMEOUT):
                await ws.recv()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1001
    assert await serving.wait_exit() == 69
    lost = await serving.wait_for_event("listener_lost")
    assert lost["action"] == "exit"
    assert serving.output[-1].startswith("Error: the LISTEN connection was lost")


async def test_killed_pool_connections_cost_no_message(gateway: Running, db: DB) -> None:
    """A NOTIFY on a dead pooled connection is retried on a fresh one: the reader still gets it."""
    chat = channel_name()
    async with gateway.connect(f"/{chat}/{make_token({'mode': 'rw'})}") as ws:
        await subscribed(gateway, chat)
        await ws.send("warm up")
        assert (await recv_json(ws))["payload"] == "warm up"
        await db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'pgws-notify' AND pid <> pg_backend_pid()"
        )
        await ws.send("after the kill")
        assert (await recv_json(ws))["payload"] == "after the kill"


async def test_sigterm_closes_sockets_with_1001_and_exits_0(serve_process: Any, db: DB) -> None:
    """SIGTERM: sockets get 1001, database connections close, exit status 0."""
    serving, port = await serve_process()
    listen_channel = serving.events[-1]["listen_channel"]
    async with connect(f"ws://127.0.0.1:{port}/x/{make_token({'mode': 'rw'})}") as ws:
        await signal_closes_1001_and_exits_0(serving, ws, signal.SIGTERM)
    await serving.wait_for_event("server_stopped")
    cursor = await db.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE query = %s", (f'LISTEN "{listen_channel}"',)
    )
    assert await cursor.fetchone() == (0,)


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "null",
        "[]",
        '{"channel": null}',
        '{"channel": ["x"]}',
        '{"channel": "%s", "n": 1' + "0" * 400 + "}",
        '{"channel": "%s", "nested": ' + "[" * 500 + "]" * 500 + "}",
        "\u2603 snow",
        '"just a string"',
    ],
)
async def test_any_notification_text_is_delivered_or_ignored(
    gateway: Running, db: DB, payload: str
) -> None:
    """Odd producer payloads never break the listener: the next normal one still arrives."""
    chat = channel_name()
    async with gateway.connect(f"/{chat}/{make_token({'mode': 'r'})}") as ws:
        await subscribed(gateway, chat)
        text = payload.replace("%s", chat)
        await gateway.notify(db, text)
        await gateway.notify(db, {"channel": chat, "payload": "after"})
        async with asyncio.timeout(TIMEOUT):
            first = await ws.recv()
            if "%s" in payload:
                assert first == text
                first = await ws.recv()
        assert json.loads(first)["payload"] == "after"
