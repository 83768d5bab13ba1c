"""Issue-4 hardening end to end: limits, audience/issuer, origins, tokens outside the URL."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import psycopg
import pytest
from structlog.testing import capture_logs
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol

from pgws.config import Config
from pgws.errors import ConfigError
from tests.conftest import (
    TIMEOUT,
    Running,
    StartGateway,
    channel_name,
    make_token,
    recv_json,
    subscribed,
)

DB = psycopg.AsyncConnection[Any]


async def refused(gateway: Running, path: str, **kwargs: Any) -> tuple[int, str]:
    """Status and body of a refused upgrade."""
    with pytest.raises(InvalidStatus) as caught:
        async with gateway.connect(path, **kwargs):
            pass
    return caught.value.response.status_code, caught.value.response.body.decode().strip()


async def test_more_channels_than_max_channels_is_403(start_gateway: StartGateway) -> None:
    """PGWS_MAX_CHANNELS bounds what one `/<jwt>` socket may use."""
    gateway: Running = await start_gateway(max_channels=2)
    token = make_token({"mode": "r", "channels": ["a", "b", "c"]})
    assert await refused(gateway, f"/{token}") == (403, "too many channels: at most 2")
    async with gateway.connect(f"/{make_token({'mode': 'r', 'channels': ['a', 'b']})}"):
        pass


@pytest.mark.parametrize(
    ("claims", "accepted"),
    [
        ({"aud": "pgws", "iss": "auth"}, True),
        ({"aud": ["other", "pgws"], "iss": "auth"}, True),
        ({"aud": "other", "iss": "auth"}, False),
        ({"iss": "auth"}, False),
        ({"aud": "pgws"}, False),
        ({"aud": "pgws", "iss": "evil"}, False),
        ({"aud": 7, "iss": "auth"}, False),
    ],
)
async def test_audience_and_issuer_are_enforced_when_configured(
    start_gateway: StartGateway, claims: dict[str, Any], accepted: bool
) -> None:
    """With PGWS_JWT_AUDIENCE/ISSUER set, tokens must carry them (401 otherwise)."""
    gateway: Running = await start_gateway(jwt_audience="pgws", jwt_issuer="auth")
    path = f"/chat/{make_token({'mode': 'r', **claims})}"
    if accepted:
        async with gateway.connect(path):
            return
    assert await refused(gateway, path) == (401, "invalid token")


async def test_origins_outside_the_allowed_list_are_403(start_gateway: StartGateway) -> None:
    """PGWS_ALLOWED_ORIGINS refuses other browser origins; an allowed one (any case) gets in."""
    allowed = frozenset({"https://app.example.com"})
    gateway: Running = await start_gateway(allowed_origins=allowed)
    path = f"/chat/{make_token({'mode': 'r'})}"
    status = await refused(gateway, path, origin="https://evil.example.com")
    assert status == (403, "origin not allowed")
    async with gateway.connect(path, origin="https://APP.example.com"):
        pass
    async with gateway.connect(path):  # no Origin header: not a browser
        pass


async def test_sockets_beyond_max_connections_get_503(start_gateway: StartGateway) -> None:
    """PGWS_MAX_CONNECTIONS: the next upgrade is refused with 503 until a socket closes."""
    gateway: Running = await start_gateway(max_connections=2)
    chat = channel_name()
    path = f"/{chat}/{make_token({'mode': 'r'})}"
    async with gateway.connect(path), gateway.connect(path):
        await subscribed(gateway, chat, 2)
        assert await refused(gateway, path) == (503, "too many connections")


async def test_bearer_header_token_with_channel_path(gateway: Running) -> None:
    """`Authorization: Bearer <jwt>` on `/<channel>` opens that channel."""
    chat = channel_name()
    headers = {"Authorization": f"Bearer {make_token({'mode': 'rw'})}"}
    async with gateway.connect(f"/{chat}", additional_headers=headers) as ws:
        await subscribed(gateway, chat)
        await ws.send("via header")
        assert (await recv_json(ws))["payload"] == "via header"


async def test_bearer_header_token_on_root_opens_every_granted_channel(gateway: Running) -> None:
    """`Authorization: Bearer` on `/` grants all the token's channels."""
    first, second = channel_name(), channel_name()
    token = make_token({"mode": "r", "channels": [first, second]})
    async with gateway.connect("/", additional_headers={"Authorization": f"Bearer {token}"}):
        await subscribed(gateway, first)
        await subscribed(gateway, second)


async def test_subprotocol_token_with_jwt_marker_selects_jwt(gateway: Running) -> None:
    """Browsers: `new WebSocket(url, ["jwt", token])` is accepted and answered with "jwt"."""
    chat = channel_name()
    token = make_token({"mode": "r"})
    async with gateway.connect(f"/{chat}", subprotocols=["jwt", token]) as ws:
        assert ws.subprotocol == "jwt"
        await subscribed(gateway, chat)


async def test_subprotocol_token_alone_is_echoed(gateway: Running) -> None:
    """`new WebSocket(url, [token])` is accepted with the token echoed, as browsers require."""
    token = make_token({"mode": "r"})
    async with gateway.connect("/chat", subprotocols=[token]) as ws:
        assert ws.subprotocol == token


async def test_bad_header_token_is_401_and_bad_path_shape_is_400(gateway: Running) -> None:
    """Header tokens are verified like URL tokens; with one, `/a/b` is a malformed path."""
    forged = make_token({"mode": "r"}, secret="not-the-secret-not-the-secret-xx")
    headers = {"Authorization": f"Bearer {forged}"}
    assert await refused(gateway, "/chat", additional_headers=headers) == (401, "invalid token")
    good = {"Authorization": f"Bearer {make_token({'mode': 'r'})}"}
    status, _ = await refused(gateway, "/a/b", additional_headers=good)
    assert status == 400


async def test_url_token_still_works_next_to_unrelated_subprotocols(gateway: Running) -> None:
    """A client offering a non-token subprotocol keeps the URL form and negotiates nothing."""
    async with gateway.connect(
        f"/chat/{make_token({'mode': 'r'})}",
        subprotocols=["chat.v1"],
    ) as ws:
        assert ws.subprotocol is None


@pytest.mark.parametrize("offered", ["wamp.2.json", "v1.chat.proto", "a.b.c", "mqtt.v3.1"])
async def test_dotted_subprotocols_next_to_a_url_token_are_not_taken_for_tokens(
    gateway: Running, offered: str
) -> None:
    """Issue 8 item 14: `wamp.2.json` has three dotted parts, was read as a token and got 400.

    The original accepts the socket and negotiates nothing; so does pgws."""
    async with gateway.connect(
        f"/chat/{make_token({'mode': 'r'})}", subprotocols=[Subprotocol(offered)]
    ) as ws:
        assert ws.subprotocol is None


async def test_short_hmac_secret_is_warned_about_at_start(start_gateway: StartGateway) -> None:
    """An HS256 secret under 32 bytes starts, with a loud warning."""
    with capture_logs() as logs:
        await start_gateway(jwt_secret=b"short-secret")
    assert any(entry["event"] == "jwt_secret_weak" and entry["bytes"] == 12 for entry in logs)


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


@pytest.mark.nodb
@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("PGWS_ALLOWED_ORIGINS", "app.example.com", "expected origins like"),
        ("PGWS_ALLOWED_ORIGINS", "https://a.example.com/path", "expected origins like"),
        ("PGWS_ALLOWED_ORIGINS", " , ", "lists no origin"),
        ("PGWS_MAX_CHANNELS", "0", "between"),
        ("PGWS_MAX_CONNECTIONS", "none", "expected an integer"),
    ],
)
def test_new_settings_are_validated(name: str, value: str, problem: str) -> None:
    """Each hardening setting refuses bad values with a message naming it."""
    env = {"PGWS_DB_URI": "postgresql://x", "PGWS_JWT_SECRET": "s" * 32, name: value}
    with pytest.raises(ConfigError, match=problem) as caught:
        Config.from_env(env)
    assert caught.value.name == name


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


@pytest.mark.nodb
def test_der_public_key_or_certificate_is_never_an_hmac_secret() -> None:
    """A DER-encoded public key as PGWS_JWT_SECRET is refused: it must never verify HS256."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from pgws.claims import Verifier

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(ConfigError, match="public key or certificate") as caught:
        Verifier.from_secret(der)
    assert caught.value.name == "PGWS_JWT_SECRET"


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
