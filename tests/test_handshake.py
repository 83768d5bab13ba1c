"""The upgrade end to end: limits, audience/issuer, origins, tokens outside the URL."""

from __future__ import annotations

from typing import Any

import pytest
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from tests.conftest import (
    Running,
    StartGateway,
    channel_name,
    make_token,
    recv_json,
    subscribed,
)


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
