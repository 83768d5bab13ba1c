"""One socket's life end to end: frames published with backpressure, errors that close it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import psycopg
import pytest
from structlog.testing import capture_logs
from websockets.exceptions import ConnectionClosed

from pgws import session
from tests.conftest import (
    TIMEOUT,
    Running,
    channel_name,
    make_token,
    recv_json,
    subscribed,
    until,
)

DB = psycopg.AsyncConnection[Any]


async def test_text_frame_with_invalid_utf8_closes_with_1007(gateway: Running) -> None:
    """A text frame that is not UTF-8 is a protocol error: close 1007, nothing sent."""
    async with gateway.connect(f"/{channel_name()}/{make_token({'mode': 'w'})}") as ws:
        await ws.send(b"\xff\xfe", text=True)
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(TIMEOUT):
                await ws.recv()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1007


async def test_a_flooding_writer_does_not_hold_up_other_channels(gateway: Running, db: DB) -> None:
    """While one socket floods frames as fast as it can, a reader elsewhere still gets its news."""
    flood, quiet = channel_name(), channel_name()
    stop = asyncio.Event()

    async def flood_forever(ws: Any) -> int:
        sent = 0
        while not stop.is_set():
            await ws.send(f"flood {sent}")
            sent += 1
            if sent % 100 == 0:
                await asyncio.sleep(0)  # let the rest of this test run on the shared loop
        return sent

    async with (
        gateway.connect(f"/{flood}/{make_token({'mode': 'w'})}") as writer,
        gateway.connect(f"/{quiet}/{make_token({'mode': 'r'})}") as reader,
    ):
        await subscribed(gateway, quiet)
        flooding = asyncio.create_task(flood_forever(writer))
        try:
            for index in range(5):
                await gateway.notify(db, {"channel": quiet, "payload": f"news {index}"})
                assert (await recv_json(reader))["payload"] == f"news {index}"
        finally:
            stop.set()
            sent = await flooding
    assert sent > 100
    # Backpressure, not buffering: the server has sent about as much as the client has written.
    assert gateway.gateway.notifier.sent >= gateway.gateway.socket_stats.frames_in - 64


async def test_a_bug_in_one_handler_closes_that_socket_with_1011_only(
    gateway: Running, db: DB
) -> None:
    """An unexpected exception in a socket's handler is logged and closes it 1011; others go on."""
    daemon = gateway.gateway
    real_clock = daemon.clock
    calls = 0

    def clock_that_breaks_once() -> float:  # the clock is the one thing tests may replace
        nonlocal calls
        calls += 1
        if calls == 3:  # 1: token check, 2: socket opened, 3: the first frame's envelope
            raise RuntimeError("simulated bug")
        return real_clock()

    chat = channel_name()
    async with gateway.connect(f"/{chat}/{make_token({'mode': 'r'})}") as bystander:
        await subscribed(gateway, chat)
        daemon.clock = clock_that_breaks_once
        with capture_logs() as logs:
            async with gateway.connect(f"/{channel_name()}/{make_token({'mode': 'w'})}") as ws:
                await ws.send("trigger")
                with pytest.raises(ConnectionClosed) as closed:
                    async with asyncio.timeout(TIMEOUT):
                        await ws.recv()
        daemon.clock = real_clock
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1011
        assert any(entry["event"] == "handler_crashed" for entry in logs)
        await gateway.notify(db, {"channel": chat, "payload": "still here"})
        assert (await recv_json(bystander))["payload"] == "still here"


async def test_writers_flooding_at_once_have_every_frame_delivered_once_in_order(
    gateway: Running, dsn: str
) -> None:
    """Each writing socket keeps several NOTIFYs in flight (WINDOW) while 20 write at once: a
    LISTEN sees every frame of every socket once, each socket's in the order it sent them."""
    writers, each = 20, 60
    chat = channel_name()
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as listener:
        await listener.execute(f'LISTEN "{gateway.config.listen_channel}"')

        async def flood(writer: int) -> None:
            async with gateway.connect(f"/{chat}/{make_token({'mode': 'w'})}") as ws:
                for seq in range(each):
                    await ws.send(f"{writer}:{seq}")
                await ws.close()

        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(*(flood(writer) for writer in range(writers)))
        payloads = [
            json.loads(n.payload)["payload"]
            async for n in listener.notifies(timeout=TIMEOUT, stop_after=writers * each)
        ]
        payloads += [json.loads(n.payload)["payload"] async for n in listener.notifies(timeout=0.3)]
    seen: dict[int, list[int]] = {writer: [] for writer in range(writers)}
    for payload in payloads:
        writer, seq = payload.split(":")
        seen[int(writer)].append(int(seq))
    for writer in range(writers):
        assert seen[writer] == list(range(each)), f"writer {writer}: {seen[writer]}"


async def test_killed_sender_backends_cost_flooding_writers_nothing(
    gateway: Running, dsn: str, db: DB
) -> None:
    """Sender backends terminated three times while 20 sockets flood with NOTIFYs in flight: no
    writer is closed, and a LISTEN sees every frame of every socket, first arrivals in the order
    sent. Delivery is at least once: a NOTIFY committed just before its backend died, its answer
    lost, is sent again with what followed it, so a short run may be seen twice (seen once in
    about one run of eight here)."""
    writers, each = 20, 150
    chat = channel_name()
    notifier = gateway.gateway.notifier
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as listener:
        await listener.execute(f'LISTEN "{gateway.config.listen_channel}"')

        async def flood(writer: int) -> None:
            async with gateway.connect(f"/{chat}/{make_token({'mode': 'w'})}") as ws:
                for seq in range(each):
                    await ws.send(f"{writer}:{seq}")
                await ws.close()
                assert ws.close_code == 1000

        async def kill() -> None:
            for share in (0.2, 0.45, 0.7):
                await until(lambda: notifier.sent >= share * writers * each, f"{share:.0%}")  # noqa: B023
                await db.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'pgws-notify' AND datname = current_database()"
                )

        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(*(flood(writer) for writer in range(writers)), kill())
        payloads = [
            json.loads(n.payload)["payload"]
            async for n in listener.notifies(timeout=TIMEOUT, stop_after=writers * each)
        ]
        payloads += [json.loads(n.payload)["payload"] async for n in listener.notifies(timeout=0.3)]
    assert notifier.failed == 0
    assert notifier.resent > 0, "no kill hit a connection with NOTIFYs in flight"
    seen: dict[int, list[int]] = {writer: [] for writer in range(writers)}
    for payload in payloads:
        writer, seq = payload.split(":")
        seen[int(writer)].append(int(seq))
    for writer in range(writers):
        firsts = list(dict.fromkeys(seen[writer]))
        assert firsts == list(range(each)), f"writer {writer}: {seen[writer]}"
        resent = len(seen[writer]) - each
        assert resent <= 3 * session.WINDOW, f"writer {writer}: {resent} seen twice"
