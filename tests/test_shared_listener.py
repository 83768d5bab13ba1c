"""One LISTEN connection per host for `--workers N` (pgws/shared_listener.py): election, relay,
hand-over when the worker holding it dies, and the relay's framing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect

from pgws.client import Client
from pgws.shared_listener import decode_batch, encode_batch
from tests.conftest import TIMEOUT, channel_name, make_token, recv_json


async def listen_backends(dsn: str) -> int:
    """LISTEN connections pgws holds on the test database right now."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cursor = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = 'pgws-listener' AND datname = current_database()"
        )
        row = await cursor.fetchone()
    return int(row[0]) if row else 0


def listening(serving: Any, after: int = 0) -> list[dict[str, Any]]:
    return [e for e in serving.events[after:] if e.get("event") == "listener_connected"]


async def test_workers_of_one_host_hold_one_listen_connection_and_all_hear_it(
    serve_process: Any, dsn: str
) -> None:
    serving, port = await serve_process(PGWS_WORKERS="3")
    await serving.wait_for_event("workers_ready")
    assert len(listening(serving)) == 1
    assert await listen_backends(dsn) == 1
    chat = channel_name()
    url = f"ws://127.0.0.1:{port}/{chat}/{make_token({'mode': 'rw'})}"
    async with contextlib.AsyncExitStack() as stack:
        sockets = [await stack.enter_async_context(connect(url)) for _ in range(30)]
        served_by = {e["worker"] for e in serving.events if e.get("event") == "client_connected"}
        assert len(served_by) >= 2, "the kernel put every socket on one worker"
        await sockets[0].send("to every worker")
        for ws in sockets:
            async with asyncio.timeout(TIMEOUT):
                assert (await recv_json(ws))["payload"] == "to every worker"
    serving.process.send_signal(signal.SIGTERM)
    assert await serving.wait_exit() == 0


async def test_when_the_listening_worker_dies_another_takes_the_listen_over(
    serve_process: Any, dsn: str
) -> None:
    """SIGKILL the worker holding the LISTEN: a sibling takes it over, readers on the survivors
    hear new messages, and when the dead worker's replacement starts there is still only one."""
    serving, port = await serve_process(PGWS_WORKERS="3")
    await serving.wait_for_event("workers_ready")
    leader = listening(serving)[0]["worker"]
    leader_pid = next(
        e["pid"]
        for e in serving.events
        if e.get("event") == "worker_started" and e["worker"] == leader
    )
    chat = channel_name()
    url = f"ws://127.0.0.1:{port}/{chat}/{make_token({'mode': 'rw'})}"
    async with contextlib.AsyncExitStack() as stack:
        sockets = [await stack.enter_async_context(connect(url)) for _ in range(30)]
        survivors = [ws for ws in sockets if await served_by(serving, ws) != leader]
        assert survivors, "every socket landed on the worker that listens"

        mark = len(serving.events)
        os.kill(leader_pid, signal.SIGKILL)
        taken = await serving.wait_for_event("shared_listener_taken_over", after=mark)
        assert taken["worker"] != leader
        await serving.wait_for_event("listener_connected", after=mark)
        # The hand-over may lose what was sent meanwhile (as any LISTEN outage does), so probe
        # until the new holder relays, then expect one message on every surviving socket.
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as db:
            channel = serving_channel(serving)
            first = survivors[0]
            async with asyncio.timeout(TIMEOUT):
                probe = 0
                while True:
                    await db.execute("SELECT pg_notify(%s, %s)", (channel, envelope(chat, probe)))
                    try:
                        got = await asyncio.wait_for(recv_json(first), 0.5)
                    except TimeoutError:
                        probe += 1
                        continue
                    if got["payload"] == f"probe-{probe}":
                        break
            await db.execute("SELECT pg_notify(%s, %s)", (channel, envelope(chat, "after")))
        for ws in survivors:
            async with asyncio.timeout(TIMEOUT):
                while (await recv_json(ws))["payload"] != "probe-after":
                    pass
        await serving.wait_for_event("server_started", after=mark)  # the replacement worker
        async with asyncio.timeout(TIMEOUT):  # the dead worker's backend goes when PG notices
            while (count := await listen_backends(dsn)) > 1:  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # nothing to await in PostgreSQL
        assert count == 1
    serving.process.send_signal(signal.SIGTERM)
    assert await serving.wait_exit() == 0


async def served_by(serving: Any, ws: ClientConnection) -> int:
    """The worker that logged `ws` connecting (matched on the client's port), bounded."""
    remote = "{}:{}".format(*ws.local_address[:2])
    after = 0
    while True:  # each wait is bounded by TIMEOUT
        event = await serving.wait_for_event("client_connected", after=after)
        if event.get("remote") == remote:
            return int(event["worker"])
        after = serving.events.index(event) + 1


async def test_v2_sockets_on_the_other_workers_hear_gap_after_a_hand_over(
    serve_process: Any,
) -> None:
    """Notifications sent while the listening worker is replaced are lost, as in any LISTEN
    outage: v2 sockets that stayed connected (on the other workers) get `gap` for their
    non-durable channel once a sibling listens again (SPEC 8)."""
    serving, port = await serve_process(PGWS_WORKERS="3")
    await serving.wait_for_event("workers_ready")
    leader = listening(serving)[0]["worker"]
    leader_pid = next(
        e["pid"]
        for e in serving.events
        if e.get("event") == "worker_started" and e["worker"] == leader
    )
    chat = channel_name()
    token = make_token({"mode": "r", "channels": [chat]})
    clients: list[Client] = []
    # (channel, the client's connects at that moment): 1 = told on its first connection.
    gaps: dict[int, list[tuple[str, int]]] = {}
    changed = asyncio.Event()

    def gap_of(index: int) -> Callable[[str], None]:
        def record(channel: str) -> None:
            gaps.setdefault(index, []).append((channel, clients[index].connects))
            changed.set()

        return record

    async with contextlib.AsyncExitStack() as stack:
        for index in range(12):
            client = Client(f"ws://127.0.0.1:{port}/", token, on_gap=gap_of(index),
                            initial_delay=0.05, max_delay=0.5)  # fmt: skip
            clients.append(client)
            await stack.enter_async_context(client)
            await client.subscribe(chat)
        mark = len(serving.events)
        os.kill(leader_pid, signal.SIGKILL)
        await serving.wait_for_event("shared_listener_taken_over", after=mark)
        # Wait until each client has moved (its worker died) or has been told of the gap.
        async with asyncio.timeout(TIMEOUT):
            while not all(c.connects >= 2 or i in gaps for i, c in enumerate(clients)):
                changed.clear()
                await changed.wait()
        stayed = [index for index, client in enumerate(clients) if client.connects == 1]
        assert stayed, "every client was on the worker that listened"
        assert all(gaps[index] == [(chat, 1)] for index in stayed)
    serving.process.send_signal(signal.SIGTERM)
    assert await serving.wait_exit() == 0


def serving_channel(serving: Any) -> str:
    """The PGWS_LISTEN_CHANNEL the gateway listens on, from its start-up settings line."""
    settings = next(e for e in serving.events if e.get("event") == "settings")
    return str(settings["settings"]["listen_channel"])


def envelope(channel: str, label: object) -> str:
    """A SPEC 3 envelope as a producer's NOTIFY would carry it."""
    return json.dumps({"channel": channel, "payload": f"probe-{label}"})


async def test_with_the_shared_listener_off_every_worker_listens(
    serve_process: Any, dsn: str
) -> None:
    serving, _ = await serve_process(PGWS_WORKERS="2", PGWS_SHARED_LISTENER="false")
    await serving.wait_for_event("workers_ready")
    assert len(listening(serving)) == 2
    assert await listen_backends(dsn) == 2
    serving.process.send_signal(signal.SIGTERM)
    assert await serving.wait_exit() == 0


@pytest.mark.nodb
@given(st.lists(st.text(st.characters(exclude_categories=["Cs"])), max_size=20))
def test_a_relayed_batch_arrives_as_it_was_sent(batch: list[str]) -> None:
    frame = encode_batch(batch)
    assert frame[:1] == b"N"
    assert int.from_bytes(frame[1:5], "big") == len(frame) - 5
    assert decode_batch(frame[5:]) == batch


@pytest.mark.nodb
@given(st.binary(max_size=64))
def test_a_garbled_relay_frame_is_a_value_error_never_anything_else(body: bytes) -> None:
    with contextlib.suppress(ValueError):
        decode_batch(body)
