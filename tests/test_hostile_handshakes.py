"""Hostile handshakes (issue 8, items 8, 9, 15 and 18): raw bytes on real sockets.

Each request here is one an anonymous or token-holding client can send. Every one must get a 4xx
(or a clean close), leave no ERROR line in the log and leave the server serving others.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jose import jws
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.conftest import (
    ISSUED_TOKENS,
    LOG_LINES,
    SECRET,
    TIMEOUT,
    Running,
    StartGateway,
    channel_name,
    make_token,
    recv_json,
    subscribed,
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
    """Log lines at ERROR or above, or carrying a traceback, written after `since`.

    Not warnings: asyncio's debug mode warns about slow callbacks on a loaded machine.
    """
    return [
        event
        for event in log_events(since)
        if event.get("level") in ("error", "critical", "exception") or "exception" in event
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
    assert len([e for e in log_events(since) if e.get("level") == "info"]) == 1


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
    assert statuses(answer) == ([200] if first == "/health" else [401])
    assert errors_since(since) == []
    assert len([e for e in log_events(since) if e.get("level") == "info"]) <= 1


def masked_text_frame(text: str) -> bytes:
    """A client's text frame (clients must mask), short enough for a one-byte length."""
    payload, mask = text.encode(), b"\x01\x02\x03\x04"
    assert len(payload) < 126
    masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
    return b"\x81" + bytes([0x80 | len(payload)]) + mask + masked


async def read_text_frame(reader: asyncio.StreamReader) -> str:
    """One unfragmented, unmasked text frame from the server (pgws sends no others here)."""
    first, size = await reader.readexactly(2)
    assert first == 0x81  # FIN + text
    if size == 126:
        size = int.from_bytes(await reader.readexactly(2), "big")
    return (await reader.readexactly(size)).decode()


async def test_frames_sent_with_the_upgrade_request_are_read_after_the_upgrade(
    gateway: Running,
) -> None:
    """Bytes held back until the 101 are fed in afterwards, in order: nothing sent early is lost."""
    chat = channel_name()
    token = make_token({"mode": "rw"})
    frames = masked_text_frame("first") + masked_text_frame("second")
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.gateway.port)
        writer.write(upgrade_request(f"/{chat}/{token}") + frames)
        head = await reader.readuntil(b"\r\n\r\n")
        assert statuses(head) == [101]
        # A rw socket hears its own messages back through the database.
        payloads = [json.loads(await read_text_frame(reader))["payload"] for _ in range(2)]
        writer.close()
    assert payloads == ["first", "second"]


# --- item 9: the open-socket count cannot leak ------------------------------------------------

UNCARRIABLE_CLAIMS = {
    "1e400 and 2**64": '"inf":1e400,"big":18446744073709551616',
    "NaN and 2**64": '"nan":NaN,"big":18446744073709551616',
    "Infinity": '"inf":-Infinity',
    "nested 500 deep": '"x":' + "[" * 500 + "]" * 500,
}


@pytest.mark.parametrize("extra", UNCARRIABLE_CLAIMS.values(), ids=UNCARRIABLE_CLAIMS.keys())
async def test_claims_no_envelope_can_carry_are_refused_and_leave_no_socket_counted(
    start_gateway: StartGateway, extra: str
) -> None:
    """Before: the upgrade succeeded, the handler crashed after counting the socket (1011, ERROR)
    and with PGWS_MAX_CONNECTIONS=3 three such sockets locked everyone out with 503."""
    gateway: Running = await start_gateway(max_connections=3)
    chat = channel_name()
    since = len(LOG_LINES.getvalue())
    for _ in range(3):
        token = signed(f'{{"mode":"r","channel":"{chat}",{extra}}}')
        answer = await exchange(gateway, upgrade_request(f"/{token}"))
        assert statuses(answer) == [401]
        assert answer.endswith(b"invalid token")
    assert errors_since(since) == []
    assert len(rejections(since)) == 3
    async with gateway.connect(f"/{chat}/{make_token({'mode': 'r'})}"):
        await subscribed(gateway, chat)


async def test_a_handler_failing_right_after_counting_its_socket_still_uncounts_it(
    start_gateway: StartGateway,
) -> None:
    """Before: a failure between counting and the handler's try (here the clock, the one thing
    tests may replace) left the socket counted: the next client got 503 for good."""
    gateway: Running = await start_gateway(max_connections=1)
    daemon = gateway.gateway
    real_clock = daemon.clock
    calls = 0

    def clock_that_breaks_once() -> float:
        nonlocal calls
        calls += 1
        if calls == 3:  # 1: token check, 2: socket opened, 3: the expiry timer, after counting
            raise RuntimeError("simulated bug")
        return real_clock()

    chat = channel_name()
    daemon.clock = clock_that_breaks_once
    expiring = make_token({"mode": "r", "exp": int(real_clock()) + 600})
    try:
        async with gateway.connect(f"/{chat}/{expiring}") as ws:
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(TIMEOUT):
                    await ws.recv()
    finally:
        daemon.clock = real_clock
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1011
    async with gateway.connect(f"/{chat}/{make_token({'mode': 'r'})}"):
        await subscribed(gateway, chat)


# --- item 15: claimed channels follow the path's rules ----------------------------------------

BAD_CHANNELS = {
    "empty": "",
    "NUL": "a\x00b",
    "1000 bytes": "a" * 1000,
    "bidi override": "chat\u202egnp.exe",
    "lone surrogate": "a\ud800b",
    "C1 control": "a\x85b",
}


@pytest.mark.parametrize("claim", ["channel", "channels"])
@pytest.mark.parametrize("name", BAD_CHANNELS.values(), ids=BAD_CHANNELS.keys())
async def test_bad_channel_names_in_claims_are_403_with_a_reason(
    gateway: Running, claim: str, name: str
) -> None:
    """Before: accepted (empty, NUL, 1,000 bytes, bidi), or a 1011 and an ERROR (lone surrogate)."""
    value: Any = name if claim == "channel" else ["ok", name]
    token = make_token({"mode": "rw", claim: value})
    since = len(LOG_LINES.getvalue())
    with pytest.raises(InvalidStatus) as caught:
        async with gateway.connect(f"/{token}"):
            pass
    response = caught.value.response
    assert response.status_code == 403
    assert response.body.decode().startswith("invalid channel claim: ")
    assert errors_since(since) == []


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    name=st.text(st.characters(exclude_categories=()), max_size=70)  # surrogates too
    | st.sampled_from(list(BAD_CHANNELS.values()))
)
async def test_any_claimed_channel_is_accepted_and_works_or_refused_with_403(
    gateway: Running, db: DB, name: str
) -> None:
    """Any string as the `channel` claim: a working socket, or 403; never a 500 or a 1011."""
    token = make_token({"mode": "rw", "channel": name})
    since = len(LOG_LINES.getvalue())
    status = 101
    try:
        async with gateway.connect(f"/{token}") as ws:
            await subscribed(gateway, name)
            await ws.send("ping")
            assert (await recv_json(ws))["payload"] == "ping"
    except InvalidStatus as refused:
        status = refused.response.status_code
    assert status in (101, 403)
    assert errors_since(since) == []


# --- item 18: Upgrade is a list -------------------------------------------------------------


@pytest.mark.parametrize("upgrade", ["websocket, h2c", "h2c, websocket", "WebSocket,foo/2"])
async def test_an_upgrade_list_naming_websocket_is_upgraded(
    start_gateway: StartGateway, db: DB, tmp_path: Path, upgrade: str
) -> None:
    """Before: a 404 from the static files (the header was compared whole with `websocket`)."""
    gateway: Running = await start_gateway(root_path=tmp_path)
    chat = channel_name()
    request = upgrade_request(
        f"/{chat}/{make_token({'mode': 'r'})}", upgrade=f"Upgrade: {upgrade}\r\n"
    )
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.gateway.port)
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        assert statuses(head) == [101]
        assert b"\r\nUpgrade: websocket\r\n" in head
        await subscribed(gateway, chat)
        await gateway.notify(db, {"channel": chat, "payload": "hi"})
        message = json.loads(await read_text_frame(reader))
        writer.close()
    assert message["payload"] == "hi"
