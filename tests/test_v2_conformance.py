"""SPEC 8 row by row, on one real server per test, legacy and pgws.v2 sockets side by side.

Each test names the SPEC 8 row it checks; the README's protocol section lists them.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import psycopg
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from pgws.errors import NotifyFailed
from pgws.parsers import ChannelSet
from tests.conftest import (
    TIMEOUT,
    Running,
    StartGateway,
    assert_nothing_received,
    channel_name,
    drain_until_closed,
    make_token,
    now,
    recv_json,
    subscribed,
    until,
)

DB = psycopg.AsyncConnection[Any]
V2 = [Subprotocol("pgws.v2")]


def v2_connect(gateway: Running, path: str = "/", **kwargs: Any) -> Any:
    return gateway.connect(path, subprotocols=V2, **kwargs)


async def request(ws: ClientConnection, **fields: Any) -> dict[str, Any]:
    """Send one request and read the next frame (its reply)."""
    await ws.send(json.dumps(fields))
    return await recv_json(ws)


async def auth(ws: ClientConnection, claims: dict[str, Any]) -> dict[str, Any]:
    reply = await request(ws, op="auth", token=make_token(claims), ref="auth")
    assert reply["op"] == "ok", reply
    return reply


async def closed_with(ws: ClientConnection) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed) as closed:
        await drain_until_closed(ws)
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code, closed.value.rcvd.reason


async def v2_subscribed(gateway: Running, channel: str, count: int = 1) -> None:
    await until(
        lambda: len(gateway.gateway.registry._v2.get(channel, ())) >= count,
        f"{count} v2 readers on {channel}",
    )


# Subprotocol selection, and legacy clients unchanged


async def test_pgws_v2_is_selected_when_offered_and_legacy_offers_are_unchanged(
    gateway: Running,
) -> None:
    token = make_token({"mode": "r", "channels": ["chat"]})
    async with v2_connect(gateway) as ws:
        assert ws.subprotocol == "pgws.v2"
    async with gateway.connect("/chat", subprotocols=["jwt", token]) as legacy:
        assert legacy.subprotocol == "jwt"
    async with gateway.connect(f"/chat/{token}") as plain:
        assert plain.subprotocol is None


# Authentication


async def test_first_frame_auth_replies_ok_with_mode_exp_and_dropped(gateway: Running) -> None:
    async with v2_connect(gateway) as ws:
        await ws.send(json.dumps({"op": "auth", "token": make_token({"mode": "rw"}), "ref": 1}))
        async with asyncio.timeout(TIMEOUT):
            assert await ws.recv() == '{"op":"ok","ref":1,"mode":"rw","exp":null,"dropped":[]}'


async def test_no_auth_within_the_timeout_closes_4401(start_gateway: StartGateway) -> None:
    gateway: Running = await start_gateway(auth_timeout=0.3)
    async with v2_connect(gateway) as ws:
        assert await closed_with(ws) == (4401, "auth timeout")


async def test_a_failed_first_auth_is_err_401_then_close_4401(gateway: Running) -> None:
    async with v2_connect(gateway) as ws:
        reply = await request(ws, op="auth", token="not.a.token", ref=2)
        assert reply == {
            "op": "err",
            "ref": 2,
            "code": 401,
            "reason": "invalid token",
            "retry": False,
        }
        assert (await closed_with(ws))[0] == 4401


async def test_another_op_before_auth_is_401_then_4401(gateway: Running) -> None:
    async with v2_connect(gateway) as ws:
        assert (await request(ws, op="sub", ch="chat"))["code"] == 401
        assert (await closed_with(ws))[0] == 4401


async def test_a_handshake_token_authenticates_and_the_path_channel_is_not_subscribed(
    gateway: Running, db: DB
) -> None:
    chat = channel_name()
    token = make_token({"mode": "r", "channels": [chat]})
    async with (
        v2_connect(gateway, f"/{chat}/{token}") as in_path,
        v2_connect(
            gateway, f"/{chat}", additional_headers={"Authorization": f"Bearer {token}"}
        ) as in_header,
        gateway.connect(f"/{chat}/{token}") as legacy,
    ):
        await subscribed(gateway, chat)
        await gateway.notify(db, {"channel": chat, "n": 1})
        assert (await recv_json(legacy))["n"] == 1
        await assert_nothing_received(in_path)
        await assert_nothing_received(in_header, within=0.05)
        assert (await request(in_path, op="ping", ref="p")) == {"op": "pong", "ref": "p"}


async def test_a_v2_path_channel_that_is_not_granted_is_refused_403(gateway: Running) -> None:
    token = make_token({"mode": "r", "channels": ["a"]})
    with pytest.raises(Exception, match="403"):
        async with v2_connect(gateway, f"/b/{token}"):
            pass


# sub / msg / unsub


async def test_sub_replies_ok_and_msg_carries_the_raw_payload(gateway: Running, db: DB) -> None:
    chat = channel_name()
    async with (
        v2_connect(gateway) as ws,
        gateway.connect(f"/{chat}/{make_token({'mode': 'r'})}") as legacy,
    ):
        await auth(ws, {"mode": "r"})
        assert await request(ws, op="sub", ch=chat, ref=3) == {"op": "ok", "ref": 3, "ch": chat}
        await subscribed(gateway, chat)
        raw = json.dumps({"channel": chat, "payload": "hi", "x": [1, 2.5]})
        await gateway.notify(db, raw)
        async with asyncio.timeout(TIMEOUT):
            assert await ws.recv() == f'{{"op":"msg","ch":"{chat}","data":{raw}}}'
            assert await legacy.recv() == raw  # legacy readers: the raw text, as ever


async def test_a_payload_that_is_not_json_is_a_string_in_msg(gateway: Running, db: DB) -> None:
    listen = gateway.config.listen_channel
    async with v2_connect(gateway) as ws:
        await auth(ws, {"mode": "r"})
        await request(ws, op="sub", ch=listen)
        await gateway.notify(db, "plain text")
        assert await recv_json(ws) == {"op": "msg", "ch": listen, "data": "plain text"}


async def test_sub_with_from_is_recovered_false_without_durable_channels(gateway: Running) -> None:
    async with v2_connect(gateway) as ws:
        await auth(ws, {"mode": "r"})
        assert await request(ws, op="sub", ch="a", **{"from": 5}) == {
            "op": "ok",
            "ch": "a",
            "recovered": False,
        }


async def test_sub_errors_403_and_409_and_unsub_ends_delivery(gateway: Running, db: DB) -> None:
    chat = channel_name()
    async with v2_connect(gateway) as reader, v2_connect(gateway) as writer:
        await auth(reader, {"mode": "r", "channels": [chat]})
        await auth(writer, {"mode": "w"})
        assert (await request(reader, op="sub", ch="other"))["code"] == 403
        assert (await request(writer, op="sub", ch=chat))["code"] == 403  # no read
        assert (await request(reader, op="unsub", ch=chat))["code"] == 409
        await request(reader, op="sub", ch=chat)
        assert (await request(reader, op="sub", ch=chat))["code"] == 409
        assert await request(reader, op="unsub", ch=chat, ref=9) == {
            "op": "ok",
            "ref": 9,
            "ch": chat,
        }
        await gateway.notify(db, {"channel": chat})
        await assert_nothing_received(reader)


# pub


async def test_pub_goes_to_one_channel_of_several_as_the_spec_3_envelope(
    gateway: Running, db: DB
) -> None:
    a, b = channel_name(), channel_name()
    token = make_token({"mode": "r", "channels": [a, b]})
    async with (
        v2_connect(gateway) as ws,
        gateway.connect(f"/{a}/{token}") as on_a,
        gateway.connect(f"/{b}/{token}") as on_b,
    ):
        await auth(ws, {"mode": "w", "channels": [a, b], "sub": "u1"})
        await subscribed(gateway, a)
        await subscribed(gateway, b)
        reply = await request(ws, op="pub", ch=a, data={"text": "hi"}, ref="m1")
        assert reply == {"op": "ok", "ref": "m1", "ch": a}
        envelope = await recv_json(on_a)
        assert envelope["event"] == "WebsocketMessage"
        assert envelope["channel"] == a
        assert envelope["payload"] == '{"text":"hi"}'
        assert envelope["claims"]["sub"] == "u1"
        assert isinstance(envelope["sender"], str)  # the one extra key SPEC 8 allows
        await assert_nothing_received(on_b)


async def test_pub_errors_403_413_and_a_malformed_frame_is_400_socket_open(
    start_gateway: StartGateway,
) -> None:
    gateway: Running = await start_gateway(max_message_size=64 * 1024)
    async with v2_connect(gateway) as ws, v2_connect(gateway) as reader:
        await auth(ws, {"mode": "w", "channels": ["a"]})
        await auth(reader, {"mode": "r"})
        assert (await request(ws, op="pub", ch="b", data=1))["code"] == 403
        assert (await request(reader, op="pub", ch="a", data=1))["code"] == 403
        assert (await request(ws, op="pub", ch="a", data="x" * 9000))["code"] == 413
        for frame in ["nope", "[]", '{"op":1}', '{"op":"pub","ch":"a"}', '{"op":"ping","ref":[]}']:
            await ws.send(frame)
            assert (await recv_json(ws))["code"] == 400
        assert (await request(ws, op="publish"))["code"] == 404
        assert await request(ws, op="ping", ref=1) == {"op": "pong", "ref": 1}


async def test_a_frame_over_max_message_size_closes_1009(start_gateway: StartGateway) -> None:
    gateway: Running = await start_gateway(max_message_size=1024)
    async with v2_connect(gateway) as ws:
        await auth(ws, {"mode": "w"})
        await ws.send(json.dumps({"op": "pub", "ch": "a", "data": "x" * 2000}))
        assert (await closed_with(ws))[0] == 1009


async def test_pub_while_the_database_is_unavailable_is_503_retry(
    gateway: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def failing(envelope: str, channel: str | None = None) -> None:
        raise NotifyFailed("database unavailable")

    monkeypatch.setattr(gateway.gateway.registry, "publish_out", failing)
    async with v2_connect(gateway) as ws:
        await auth(ws, {"mode": "w"})
        assert await request(ws, op="pub", ch="a", data=1, ref=4) == {
            "op": "err",
            "ref": 4,
            "code": 503,
            "reason": "database unavailable",
            "retry": True,
        }
        assert (await request(ws, op="ping"))["op"] == "pong"


# echo


async def test_echo_false_skips_only_the_sender_on_that_channel(gateway: Running) -> None:
    chat = channel_name()
    claims = {"mode": "rw", "channels": [chat]}
    async with v2_connect(gateway) as quiet, v2_connect(gateway) as other:
        await auth(quiet, claims)
        await auth(other, claims)
        await request(quiet, op="sub", ch=chat, echo=False)
        await request(other, op="sub", ch=chat)
        await v2_subscribed(gateway, chat, 2)
        assert (await request(quiet, op="pub", ch=chat, data="mine"))["op"] == "ok"
        heard = await recv_json(other)
        assert heard["op"] == "msg"
        assert heard["data"]["payload"] == "mine"
        await assert_nothing_received(quiet)
        # `other` hears itself (echo on by default): its `ok` and its own `msg` race (the
        # NOTIFY's answer and the notification come back on different connections).
        await other.send(json.dumps({"op": "pub", "ch": chat, "data": "yours"}))
        frames = sorted([await recv_json(other), await recv_json(other)], key=lambda f: f["op"])
        assert [frame["op"] for frame in frames] == ["msg", "ok"]
        assert frames[0]["data"]["payload"] == "yours"
        assert (await recv_json(quiet))["data"]["payload"] == "yours"


async def test_legacy_writers_envelopes_carry_no_sender(gateway: Running) -> None:
    chat = channel_name()
    async with (
        gateway.connect(f"/{chat}/{make_token({'mode': 'r'})}") as reader,
        gateway.connect(f"/{chat}/{make_token({'mode': 'w'})}") as writer,
    ):
        await subscribed(gateway, chat)
        await writer.send("hello")
        envelope = await recv_json(reader)
        assert list(envelope) == ["event", "channel", "payload", "claims"]


# refresh and expiry


async def test_refresh_swaps_the_grant_drops_channels_and_outlives_the_first_exp(
    start_gateway: StartGateway,
) -> None:
    gateway: Running = await start_gateway(expiry_warning=1.0)
    first_exp = int(now()) + 2
    async with v2_connect(gateway) as ws:
        reply = await auth(ws, {"mode": "r", "channels": ["a", "b"], "exp": first_exp})
        assert reply["exp"] == first_exp
        # `expiring` is due 1 s before exp, which a loaded machine may reach before the two
        # subscriptions are answered: the three frames may come in any order.
        await ws.send(json.dumps({"op": "sub", "ch": "a", "ref": 1}))
        await ws.send(json.dumps({"op": "sub", "ch": "b", "ref": 2}))
        frames = [await recv_json(ws) for _ in range(3)]
        assert sorted(f["ref"] for f in frames if f["op"] == "ok") == [1, 2], frames
        (expiring,) = [f for f in frames if f["op"] == "expiring"]
        assert 0 <= expiring["in"] <= 1
        later = int(now()) + 60
        refreshed = await request(
            ws, op="auth", token=make_token({"mode": "r", "channels": ["b"], "exp": later}), ref=5
        )
        assert refreshed == {"op": "ok", "ref": 5, "mode": "r", "exp": later, "dropped": ["a"]}
        await asyncio.sleep(max(first_exp - now(), 0) + 0.5)
        assert await request(ws, op="ping") == {"op": "pong"}
        assert (await request(ws, op="sub", ch="a"))["code"] == 403


async def test_a_failed_refresh_is_401_and_keeps_the_socket(gateway: Running) -> None:
    async with v2_connect(gateway) as ws:
        await auth(ws, {"mode": "r"})
        assert (await request(ws, op="auth", token="x.y.z"))["code"] == 401
        assert (await request(ws, op="sub", ch="a"))["op"] == "ok"


async def test_without_refresh_the_socket_closes_3001_at_exp(gateway: Running) -> None:
    async with v2_connect(gateway) as ws:
        # +2: int() may leave +1 only milliseconds ahead, already past by the time it is verified.
        await auth(ws, {"mode": "r", "exp": int(now()) + 2})
        code, _ = await closed_with(ws)
        assert code == 3001


# wildcards, both protocols


async def test_wildcard_grants_for_both_protocols(gateway: Running) -> None:
    token = make_token({"mode": "r", "channels": ["room:*"]})
    async with gateway.connect(f"/room:1/{token}") as legacy:
        assert legacy.protocol.state.name == "OPEN"
    with pytest.raises(Exception, match="403"):
        async with gateway.connect(f"/rooms/{token}"):
            pass
    with pytest.raises(Exception, match="403"):
        async with gateway.connect(f"/{token}"):  # a wildcard is never subscribed by itself
            pass
    async with v2_connect(gateway) as ws:
        await auth(ws, {"mode": "r", "channels": ["room:*"]})
        assert (await request(ws, op="sub", ch="room:7"))["op"] == "ok"
        assert (await request(ws, op="sub", ch="rooms"))["code"] == 403


async def test_subscriptions_beyond_pgws_max_channels_are_403(start_gateway: StartGateway) -> None:
    gateway: Running = await start_gateway(max_channels=1)
    async with v2_connect(gateway) as ws:
        await auth(ws, {"mode": "r"})
        assert (await request(ws, op="sub", ch="a"))["op"] == "ok"
        assert (await request(ws, op="sub", ch="b"))["code"] == 403
        await request(ws, op="unsub", ch="a")
        assert (await request(ws, op="sub", ch="b"))["op"] == "ok"


# gap


async def test_a_listen_outage_sends_gap_to_v2_subscribers_and_legacy_sees_nothing_new(
    start_gateway: StartGateway, db: DB
) -> None:
    """SPEC 8 `gap`: the LISTEN backend really killed; once LISTEN holds again, every v2
    subscription of a non-durable channel gets `gap` for it, before any later message."""
    gateway: Running = await start_gateway(check_listener_interval=5.0)
    a, b = channel_name(), channel_name()
    listener = gateway.gateway.listener
    async with (
        v2_connect(gateway) as ws,
        v2_connect(gateway) as idle,
        gateway.connect(f"/{a}/{make_token({'mode': 'r'})}") as legacy,
    ):
        await auth(ws, {"mode": "r"})
        await auth(idle, {"mode": "r"})
        await request(ws, op="sub", ch=a)
        await request(ws, op="sub", ch=b)
        await subscribed(gateway, a)
        old_pid = listener.backend_pid
        assert old_pid is not None
        await db.execute("SELECT pg_terminate_backend(%s)", (old_pid,))
        await until(lambda: listener.reconnects == 1, "the listener to reconnect")
        gaps = [await recv_json(ws), await recv_json(ws)]
        assert sorted(gaps, key=lambda g: g["ch"]) == sorted(
            [{"op": "gap", "ch": a}, {"op": "gap", "ch": b}], key=lambda g: g["ch"]
        )
        await gateway.notify(db, {"channel": a, "n": 1})
        assert (await recv_json(ws))["data"]["n"] == 1
        assert (await recv_json(legacy))["n"] == 1  # legacy sockets: no new frame, ever
        await assert_nothing_received(idle, within=0.05)  # no subscription, no gap


async def test_a_listen_outage_gaps_only_non_durable_subscriptions(
    start_gateway: StartGateway, db: DB
) -> None:
    """SPEC 8: `gap` is for non-durable channels; a durable subscription catches up instead."""
    gateway: Running = await start_gateway(
        check_listener_interval=5.0, durable=ChannelSet(prefixes=("dur-",))
    )
    durable, plain = "dur-" + channel_name(), channel_name()
    listener = gateway.gateway.listener
    async with v2_connect(gateway) as ws:
        await auth(ws, {"mode": "r"})
        await request(ws, op="sub", ch=durable)
        await request(ws, op="sub", ch=plain)
        await db.execute("SELECT pg_terminate_backend(%s)", (listener.backend_pid,))
        await until(lambda: listener.reconnects == 1, "the listener to reconnect")
        assert await recv_json(ws) == {"op": "gap", "ch": plain}
        await assert_nothing_received(ws)
