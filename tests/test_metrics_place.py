"""PGWS_METRICS (issue 13 item 5): /metrics on the main port, nowhere, or on its own listener."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import pytest

from pgws.config import Config
from pgws.errors import ConfigError
from tests.conftest import SECRET, TIMEOUT, Running, StartGateway, http_get, run_pgws

EX_CONFIG = 78
REQUIRED = {"PGWS_DB_URI": "postgresql://127.0.0.1:1/x", "PGWS_JWT_SECRET": SECRET}


async def request(port: int, raw: bytes) -> bytes:
    """Send `raw` to 127.0.0.1:`port`, return everything it answers until it closes."""
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        await writer.drain()
        answer = await reader.read()
        writer.close()
    return answer


async def get(port: int, path: str, method: str = "GET") -> tuple[bytes, bytes]:
    """(status line, body) of one request."""
    raw = await request(port, f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    head, _, body = raw.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0], body


def task_names() -> set[str]:
    return {task.get_name() for task in asyncio.all_tasks()}


async def test_on_by_default_serves_metrics_on_the_main_port(gateway: Running) -> None:
    status, _, body = await http_get(gateway, "/metrics")
    assert status == 200
    assert b"pgws_sockets_open" in body
    assert gateway.gateway.metrics_listener is None


async def test_off_answers_404_and_samples_nothing(start_gateway: StartGateway) -> None:
    running = await start_gateway(metrics="off")
    status, _, body = await http_get(running, "/metrics")
    assert (status, body) == (404, b"not found\n")
    assert (await http_get(running, "/health"))[0] == 200
    # No collection cost: no exposition is built and the queue sampler (a database connection
    # kept for /metrics alone) does not run.
    assert "queue-usage" not in task_names()
    assert running.gateway.metrics_listener is None


async def test_a_separate_listener_serves_only_metrics(start_gateway: StartGateway) -> None:
    running = await start_gateway(metrics="127.0.0.1:0")
    listener = running.gateway.metrics_listener
    assert listener is not None
    port = listener.port
    assert port != running.gateway.port
    status, body = await get(port, "/metrics")
    assert status == b"HTTP/1.1 200 OK"
    assert b"pgws_listener_up 1.0" in body
    assert (await get(port, "/metrics?x=1"))[0] == b"HTTP/1.1 200 OK"
    assert await get(port, "/metrics", "HEAD") == (b"HTTP/1.1 200 OK", b"")
    assert (await get(port, "/metrics", "POST"))[0] == b"HTTP/1.1 405 Method Not Allowed"
    for path in ("/", "/health", "/ready", "/index.html"):
        assert (await get(port, path))[0] == b"HTTP/1.1 404 Not Found", path
    # The main port no longer shows it, and still serves the rest.
    assert (await http_get(running, "/metrics"))[0] == 404
    assert (await http_get(running, "/ready"))[0] == 200


async def test_the_separate_listener_survives_hostile_clients(start_gateway: StartGateway) -> None:
    """Garbage gets 400, an oversized head is cut off, a silent client holds nobody up."""
    running = await start_gateway(metrics="127.0.0.1:0")
    assert running.gateway.metrics_listener is not None
    port = running.gateway.metrics_listener.port
    assert (await request(port, b"\x16\x03\x01garbage\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    assert await request(port, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20_000) == b""
    async with asyncio.timeout(TIMEOUT):
        _, silent = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert (await get(port, "/metrics"))[0] == b"HTTP/1.1 200 OK"
    finally:
        silent.close()


async def test_the_separate_listener_stops_with_the_gateway(start_gateway: StartGateway) -> None:
    running = await start_gateway(metrics="127.0.0.1:0")
    assert running.gateway.metrics_listener is not None
    port = running.gateway.metrics_listener.port
    await running.shutdown()
    with pytest.raises(ConnectionRefusedError):
        await request(port, b"GET /metrics HTTP/1.1\r\n\r\n")


async def test_a_taken_metrics_port_is_a_config_error(start_gateway: StartGateway) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError) as error:
            await start_gateway(metrics=f"127.0.0.1:{port}")
    assert str(error.value) == f"PGWS_METRICS: port {port} is already in use on 127.0.0.1"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("on", "on"), ("OFF", "off"), (" 127.0.0.1:9187 ", "127.0.0.1:9187"),
     ("[::1]:9187", "[::1]:9187"), ("localhost:09187", "localhost:9187"), ("*4:9187", "*4:9187")],
)  # fmt: skip
def test_good_values(value: str, expected: str) -> None:
    assert Config.from_env({**REQUIRED, "PGWS_METRICS": value}).metrics == expected


EXPECTED = "expected on, off or host:port such as 127.0.0.1:9187"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("yes", f"{EXPECTED}, got 'yes'"),
        ("127.0.0.1", f"{EXPECTED}, got '127.0.0.1'"),
        ("127.0.0.1:http", f"{EXPECTED}, got '127.0.0.1:http'"),
        (":9187", f"{EXPECTED}, got ':9187'"),
        ("[::1:9187", f"{EXPECTED}, got '[::1:9187'"),
        ("::1:9187", f"{EXPECTED}, got '::1:9187' (an IPv6 address goes in brackets: [::1]:9187)"),
        ("127.0.0.1:70000", "port must be at most 65535, got '127.0.0.1:70000'"),
        ("a b:9187", "expected *4, *6, * or a host or address, got 'a b'"),
    ],
)
def test_bad_values_are_one_line_errors(value: str, problem: str) -> None:
    with pytest.raises(ConfigError) as error:
        Config.from_env({**REQUIRED, "PGWS_METRICS": value})
    assert str(error.value) == f"PGWS_METRICS: {problem}"


@pytest.mark.nodb
def test_serve_refuses_a_bad_value_with_one_line_and_78() -> None:
    result = run_pgws("serve", env={**REQUIRED, "PGWS_METRICS": "9187"})
    assert result.returncode == EX_CONFIG
    assert result.stderr == f"Error: PGWS_METRICS: {EXPECTED}, got '9187'\n"


@pytest.mark.nodb
def test_one_port_per_worker_must_fit() -> None:
    result = run_pgws(
        "serve", "--workers", "3", env={**REQUIRED, "PGWS_METRICS": "127.0.0.1:65534"}
    )
    assert result.returncode == EX_CONFIG
    assert result.stderr == ("Error: PGWS_METRICS: port 65534 + one per worker (3) passes 65535\n")


def free_port_pair() -> int:
    """A port P with P and P + 1 free just now."""
    for _ in range(50):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return int(port)
    raise AssertionError("no two consecutive free ports")


async def test_with_workers_each_worker_serves_its_own_port(
    serve_process: Callable[..., Any],
) -> None:
    """--workers 2 and PGWS_METRICS=host:P: worker 0 on P, worker 1 on P + 1, each its own."""
    port = free_port_pair()
    serving, _ = await serve_process("--workers", "2", PGWS_METRICS=f"127.0.0.1:{port}")
    await serving.wait_for_event("workers_ready")  # after every worker's metrics_listening
    listening = sorted(
        (int(event["worker"]), int(event["port"]))
        for event in serving.events
        if event.get("event") == "metrics_listening"
    )
    assert listening == [(0, port), (1, port + 1)]
    for each in (port, port + 1):
        status, body = await get(each, "/metrics")
        assert status == b"HTTP/1.1 200 OK"
        assert b"pgws_listener_up 1.0" in body


async def test_an_ipv6_listener_in_brackets(start_gateway: StartGateway) -> None:
    running = await start_gateway(metrics="[::1]:0")
    assert running.gateway.metrics_listener is not None
    port = running.gateway.metrics_listener.port
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection("::1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: [::1]\r\n\r\n")
        await writer.drain()
        status = await reader.readline()
        writer.close()
    assert status == b"HTTP/1.1 200 OK\r\n"
