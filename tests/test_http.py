"""Plain HTTP on the gateway's port: /health, /ready, /metrics (SPEC 5)."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import psycopg
from websockets.exceptions import InvalidStatus

from dev.devdb import ThrowawayPostgres
from tests.conftest import (
    TIMEOUT,
    Running,
    StartGateway,
    channel_name,
    http_get,
    make_token,
    recv_json,
    subscribed,
    until,
)

DB = psycopg.AsyncConnection[Any]


def metric(text: str, name: str, labels: str = "") -> float:
    """One sample's value from Prometheus text, e.g. metric(t, "pgws_sockets_open", 'mode="r"')."""
    selector = re.escape(name + (f"{{{labels}}}" if labels else ""))
    found = re.search(rf"^{selector} (\S+)$", text, re.MULTILINE)
    assert found is not None, f"{name}{{{labels}}} not in /metrics"
    return float(found.group(1))


async def scrape(gateway: Running) -> str:
    status, headers, body = await http_get(gateway, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    return body.decode()


async def test_health_is_200_while_the_process_runs(gateway: Running) -> None:
    """/health answers 200 regardless of the database."""
    status, _, body = await http_get(gateway, "/health")
    assert (status, body) == (200, b"ok\n")


async def test_ready_follows_the_listen_connection(gateway: Running) -> None:
    """/ready is 200 with the LISTEN connection up and 503 while it is down."""
    status, _, _ = await http_get(gateway, "/ready")
    assert status == 200
    gateway.gateway.listener.up.clear()  # what listen_forever does when the link drops
    status, _, body = await http_get(gateway, "/ready")
    assert (status, body) == (503, b"not ready\n")


async def test_ready_is_200_again_once_a_killed_listener_is_replaced(
    start_gateway: StartGateway, db: DB
) -> None:
    """After pg_terminate_backend on the LISTEN backend, /ready and the metrics show it back."""
    gateway: Running = await start_gateway(check_listener_interval=60.0)
    listener = gateway.gateway.listener
    pid = listener.backend_pid
    await db.execute("SELECT pg_terminate_backend(%s)", (pid,))
    await until(lambda: listener.reconnects == 1, "the listener to come back")
    status, _, _ = await http_get(gateway, "/ready")
    assert status == 200
    text = await scrape(gateway)
    assert metric(text, "pgws_listener_reconnects_total") == 1
    assert metric(text, "pgws_listener_up") == 1


async def test_ready_is_503_while_the_database_is_down(
    start_gateway: StartGateway, cluster: ThrowawayPostgres
) -> None:
    """With PostgreSQL stopped for real, /ready is 503 (and listener_up 0) until it is back."""
    gateway: Running = await start_gateway(db_uri=cluster.uri, check_listener_interval=0.5)
    listener = gateway.gateway.listener
    await asyncio.to_thread(cluster.stop, "fast")
    await until(lambda: not listener.up.is_set(), "the listener to notice")
    status, _, body = await http_get(gateway, "/ready")
    assert (status, body) == (503, b"not ready\n")
    assert metric(await scrape(gateway), "pgws_listener_up") == 0
    status, _, _ = await http_get(gateway, "/health")
    assert status == 200
    await asyncio.to_thread(cluster.start)
    await until(listener.up.is_set, "the listener to come back")
    status, _, _ = await http_get(gateway, "/ready")
    assert status == 200


async def test_metrics_count_real_traffic_exactly(gateway: Running, db: DB) -> None:
    """After N frames from one rw socket and one reader, each counter moved by exactly N."""
    chat = channel_name()
    before = await scrape(gateway)
    frames = 5
    async with (
        gateway.connect(f"/{chat}/{make_token({'mode': 'rw'})}") as writer,
        gateway.connect(f"/{chat}/{make_token({'mode': 'r'})}") as reader,
    ):
        await subscribed(gateway, chat, 2)
        during = await scrape(gateway)
        assert metric(during, "pgws_sockets_open", 'mode="rw"') == 1
        assert metric(during, "pgws_sockets_open", 'mode="r"') == 1
        assert metric(during, "pgws_channels") == 1
        for index in range(frames):
            await writer.send(f"m{index}")
        for _ in range(frames):
            await recv_json(reader)
            await recv_json(writer)
    after = await scrape(gateway)

    def moved(name: str, labels: str = "") -> float:
        return metric(after, name, labels) - metric(before, name, labels)

    assert moved("pgws_frames_received_total") == frames
    assert moved("pgws_notifies_sent_total") == frames
    assert moved("pgws_notifications_received_total") == frames
    assert moved("pgws_messages_delivered_total") == 2 * frames
    assert metric(after, "pgws_notifies_failed_total", 'reason="database"') == 0


async def test_metrics_count_rejected_handshakes_by_reason(gateway: Running) -> None:
    """Refused upgrades are counted under a bounded reason label."""
    for path in ("/not-a-token", f"/b/{make_token({'mode': 'r', 'channels': ['a']})}"):
        try:
            async with gateway.connect(path):
                pass
        except InvalidStatus:
            pass
    text = await scrape(gateway)
    assert metric(text, "pgws_handshakes_rejected_total", 'reason="invalid_token"') == 1
    assert metric(text, "pgws_handshakes_rejected_total", 'reason="not_allowed"') == 1


async def test_reserved_paths_win_over_static_files(
    start_gateway: StartGateway, tmp_path: Any
) -> None:
    """A file named `health` in the root folder does not shadow /health."""
    (tmp_path / "health").write_text("static")
    gateway: Running = await start_gateway(root_path=tmp_path.resolve())
    status, _, body = await http_get(gateway, "/health")
    assert (status, body) == (200, b"ok\n")


async def raw_request(gateway: Running, request: bytes) -> bytes:
    """Send raw bytes, return the raw response (the server closes after it)."""
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.gateway.port)
        writer.write(request)
        await writer.drain()
        response = await reader.read()
        writer.close()
        await writer.wait_closed()
    return response


async def test_reserved_paths_take_only_get_and_head(gateway: Running) -> None:
    """POST /metrics is 405 like any other non-GET request."""
    response = await raw_request(gateway, b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 405")


async def test_websockets_own_refusals_carry_the_security_headers(gateway: Running) -> None:
    """A broken upgrade refused by websockets itself still gets nosniff and no-referrer."""
    token = make_token({"mode": "r"})
    request = (
        f"GET /x/{token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    )
    response = await raw_request(gateway, request.encode())  # no Sec-WebSocket-Key: 400
    head = response.partition(b"\r\n\r\n")[0].decode().lower()
    assert head.startswith("http/1.1 400")
    assert "x-content-type-options: nosniff" in head
    assert "referrer-policy: no-referrer" in head


async def test_ready_flips_back_within_seconds_of_a_long_outage(
    start_gateway: StartGateway, cluster: ThrowawayPostgres
) -> None:
    """Before: the listener's back-off grew to 32 s, so after 16 s down readers stayed blind (and
    /ready 503) for ~15 s more once the database was back. Now retries are at most 2 s apart."""
    gateway: Running = await start_gateway(db_uri=cluster.uri, check_listener_interval=0.5)
    listener = gateway.gateway.listener
    await asyncio.to_thread(cluster.stop, "fast")
    await until(lambda: not listener.up.is_set(), "the listener to notice")
    down = asyncio.get_running_loop().time()
    await asyncio.sleep(16)  # the outage itself, not a synchronisation
    await asyncio.to_thread(cluster.start)
    back = asyncio.get_running_loop().time()
    await until(listener.up.is_set, "the listener to come back")
    blind = asyncio.get_running_loop().time() - back
    status, _, _ = await http_get(gateway, "/ready")
    assert status == 200
    # Generous for a shared machine; the old schedule would retry only 31 s after `down`.
    assert blind < 8.0, (blind, back - down)
