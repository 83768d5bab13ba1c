"""pgws.client against real servers: in-process gateways, and `pgws serve` killed mid-traffic."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from pgws.client import AuthFailed, Client, Message, RequestFailed
from pgws.parsers import ChannelSet
from tests.conftest import (
    TIMEOUT,
    Running,
    StartGateway,
    channel_name,
    make_token,
    now,
    until,
)

DB = psycopg.AsyncConnection[Any]


async def next_message(client: Client) -> Message:
    async with asyncio.timeout(TIMEOUT):
        return await anext(client)


async def v2_readers(gateway: Running, channel: str, count: int = 1) -> None:
    await until(
        lambda: len(gateway.gateway.registry._v2.get(channel, ())) >= count,
        f"{count} v2 readers on {channel}",
    )


async def test_subscribe_and_publish_to_one_channel_of_several(gateway: Running) -> None:
    a, b = channel_name(), channel_name()
    token = make_token({"mode": "rw", "channels": [a, b]})
    async with Client(gateway.url + "/", token) as reader, Client(gateway.url, token) as writer:
        assert (await reader.subscribe(a))["ch"] == a
        await reader.subscribe(b, echo=False)
        assert await writer.publish(b, {"text": "hi"}) is None  # not durable: no position
        message = await next_message(reader)
        assert message.channel == b
        assert json.loads(message.data["payload"]) == {"text": "hi"}
        assert message.position is None
        with pytest.raises(RequestFailed) as refused:
            await writer.publish("elsewhere", 1)
        assert (refused.value.code, refused.value.retry) == (403, False)
        await writer.ping()  # still connected after an err


async def test_a_refused_token_stops_the_client_with_auth_failed(gateway: Running) -> None:
    with pytest.raises(AuthFailed) as failed:
        async with asyncio.timeout(TIMEOUT), Client(gateway.url, "not.a.token"):
            pass
    assert failed.value.code == 401
    expired = make_token({"mode": "r", "exp": int(now()) - 60})
    with pytest.raises(AuthFailed):
        async with asyncio.timeout(TIMEOUT), Client(f"{gateway.url}/{expired}", expired):
            pass  # refused at the upgrade (401): no reconnect loop either


async def test_a_token_function_refreshes_on_expiring_past_the_first_exp(
    start_gateway: StartGateway,
) -> None:
    gateway: Running = await start_gateway(expiry_warning=1.5)
    issued: list[int] = []

    def token() -> str:
        exp = int(now()) + 2 + len(issued) * 60
        issued.append(exp)
        return make_token({"mode": "r", "exp": exp})

    async with Client(gateway.url, token) as client:
        await until(lambda: len(issued) == 2, "a refresh on expiring")
        await asyncio.sleep(max(issued[0] - now(), 0) + 0.5)  # past the first token's exp
        await client.ping()
        assert client.connects == 1  # refreshed in place, never reconnected


async def test_the_gap_callback_hears_a_listen_outage(start_gateway: StartGateway, db: DB) -> None:
    gateway: Running = await start_gateway(check_listener_interval=5.0)
    ch = channel_name()
    gaps: list[str] = []
    async with Client(gateway.url, make_token({"mode": "r"}), on_gap=gaps.append) as client:
        await client.subscribe(ch)
        await db.execute("SELECT pg_terminate_backend(%s)", (gateway.gateway.listener.backend_pid,))
        await until(lambda: gaps == [ch], "the gap callback")
        await gateway.notify(db, {"channel": ch, "after": True})
        assert (await next_message(client)).data["after"] is True


async def test_a_position_the_server_cannot_resume_calls_the_gap_callback(
    start_gateway: StartGateway,
) -> None:
    gateway: Running = await start_gateway(durable=ChannelSet(prefixes=("dur-",)))
    d = "dur-" + channel_name()
    gaps: list[str] = []
    async with Client(gateway.url, make_token({"mode": "r"}), on_gap=gaps.append) as client:
        reply = await client.subscribe(d, position="00000000:00000000:1:00000000")
        assert reply["recovered"] is False
        assert gaps == [d]

    def broken(channel: str) -> None:
        raise RuntimeError(f"a bug in the caller's callback for {channel}")

    async with Client(gateway.url, make_token({"mode": "r"}), on_gap=broken) as client:
        await client.subscribe(d, position="garbage")  # the callback raises: logged, nothing else
        await client.ping()
        assert client.connects == 1


# The server process killed (SIGKILL) mid-traffic and started again


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_killing_pgws_serve_mid_traffic_resumes_durable_channels_and_gaps_the_others(
    serve_process: Callable[..., Any], db: DB
) -> None:
    port = free_port()
    env = {
        "PGWS_PORT": str(port),
        "PGWS_LISTEN_CHANNEL": channel_name(),
        "PGWS_DURABLE": "dur-*",
        "PGWS_RETRIES": "5",
    }
    serving, _ = await serve_process(**env)
    d, n = "dur-" + channel_name(), channel_name()
    gaps: list[str] = []

    async def send(payload: str) -> str:
        cursor = await db.execute("SELECT pgws.send(%s, %s)", (d, payload))
        row = await cursor.fetchone()
        assert row is not None
        return str(row[0])

    start = await send("start")  # subscribing from a position: nothing before it is missed
    token = make_token({"mode": "r"})
    client = Client(f"ws://127.0.0.1:{port}/", token, on_gap=gaps.append, initial_delay=0.1)
    async with client:
        assert (await client.subscribe(d, position=start))["recovered"] is True
        await client.subscribe(n)
        received: list[int] = []

        async def receive_forever() -> None:
            async for message in client:
                if message.channel == d:
                    received.append(message.data["i"])  # noqa: PERF401 (read as it grows)

        receiving = asyncio.create_task(receive_forever())
        try:
            for i in range(300):
                await send(json.dumps({"i": i}))
                if i == 100:
                    await until(lambda: len(received) > 50, "traffic before the kill")
                    await serving.kill()  # SIGKILL: no close frame, nothing flushed
                if i == 200:
                    serving, _ = await serve_process(**env)
            await until(lambda: len(received) == 300, "every message after the restart")
        finally:
            receiving.cancel()
        assert received == list(range(300))  # nothing lost, nothing twice, in order
        await until(lambda: client.connects == 2, "the resubscriptions")  # replays come first
        assert gaps == [n]  # the non-durable channel could not be resumed; the durable one was
