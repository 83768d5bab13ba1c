"""Hostile handshakes (issue 8, items 8, 9, 15 and 18): raw bytes on real sockets.

Each request here is one an anonymous or token-holding client can send. Every one must get a 4xx
(or a clean close), leave no ERROR line in the log and leave the server serving others.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import psycopg
import pytest
from jose import jws

from tests.conftest import (
    ISSUED_TOKENS,
    LOG_LINES,
    SECRET,
    TIMEOUT,
    Running,
    channel_name,
    make_token,
)

DB = psycopg.AsyncConnection[Any]

UPGRADE_HEADERS = (
    "Connection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Sec-WebSocket-Version: 13\r\n"
)


async def exchange(running: Running, raw: bytes) -> bytes:
    """Send `raw` on a fresh TCP connection and read everything until the server closes it."""
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", running.gateway.port)
        writer.write(raw)
        await writer.drain()
        answer = await reader.read()
        writer.close()
    return answer


def statuses(answer: bytes) -> list[int]:
    """The status code of every HTTP response in `answer`."""
    return [
        int(line.split()[1])
        for line in answer.split(b"\r\n")
        if line.startswith(b"HTTP/1.1 ") and len(line.split()) > 1
    ]


def upgrade_request(path: str, extra: str = "", upgrade: str = "Upgrade: websocket\r\n") -> bytes:
    """A WebSocket upgrade request for `path`, with `extra` header lines."""
    return (
        f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{upgrade}{UPGRADE_HEADERS}{extra}\r\n"
    ).encode()


def log_events(since: int) -> list[dict[str, Any]]:
    """Every JSON log line written after offset `since` of LOG_LINES."""
    events = []
    for line in LOG_LINES.getvalue()[since:].splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def errors_since(since: int) -> list[dict[str, Any]]:
    """Log lines at WARNING or above (or carrying a traceback) written after `since`."""
    return [
        event
        for event in log_events(since)
        if event.get("level") in ("warning", "error", "critical", "exception")
        or "exception" in event
    ]


def rejections(since: int) -> list[dict[str, Any]]:
    """The client_rejected lines written after `since`."""
    return [event for event in log_events(since) if event.get("event") == "client_rejected"]


def signed(payload: str) -> str:
    """A token signed with the suite's secret over exactly `payload` (JSON text, unnormalised)."""
    token: str = jws.sign(payload.encode(), SECRET, algorithm="HS256")
    ISSUED_TOKENS.append(token)  # for the log audit
    return token


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def nested_header_token(depth: int) -> str:
    """A token whose JOSE header is an object with a list nested `depth` levels deep."""
    header = b'{"alg":"HS256","x":' + b"[" * depth + b"]" * depth + b"}"
    return f"{b64(header)}.{b64(b'{}')}.{b64(b'sig')}"


async def test_a_token_header_nested_990_deep_is_401_invalid_token(gateway: Running) -> None:
    """Before: RecursionError while reading the header, a 500 and an ERROR traceback."""
    since = len(LOG_LINES.getvalue())
    answer = await exchange(gateway, upgrade_request(f"/{nested_header_token(990)}"))
    assert statuses(answer) == [401]
    assert answer.endswith(b"invalid token")
    assert errors_since(since) == []
    assert len(rejections(since)) == 1


async def test_two_upgrade_headers_get_a_4xx_and_no_error_log(gateway: Running) -> None:
    """Before: a 500 and an ERROR traceback."""
    token = make_token({"mode": "r", "channel": channel_name()})
    since = len(LOG_LINES.getvalue())
    two = "Upgrade: websocket\r\nUpgrade: websocket\r\n"
    answer = await exchange(gateway, upgrade_request(f"/{token}", upgrade=two))
    assert statuses(answer) == [400]
    assert answer.endswith(b"bad request: more than one Upgrade header")
    assert errors_since(since) == []
    assert len(rejections(since)) == 1


@pytest.mark.parametrize(
    "second",
    ["GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n", "garbage\r\n\r\n"],
    ids=["health", "garbage"],
)
@pytest.mark.parametrize("first", ["/health", "/not-a-token"], ids=["plain", "upgrade"])
async def test_pipelined_requests_get_one_answer_and_no_error_log(
    gateway: Running, first: str, second: str
) -> None:
    """Before: no answer, and an AssertionError from websockets logged as an ERROR."""
    since = len(LOG_LINES.getvalue())
    if first == "/health":
        request = f"GET {first} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
    else:
        request = upgrade_request(first)
    answer = await exchange(gateway, request + second.encode())
    assert len(statuses(answer)) <= 1
    assert all(400 <= status < 500 or status == 200 for status in statuses(answer))
    assert errors_since(since) == []
    assert len([e for e in log_events(since) if e.get("level") == "info"]) <= 1
