"""The `pgws.v2` protocol as a pure function (SPEC 8): any frame in, well-formed actions out."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgws.claims import Grant, Mode, channel_granted, grant_for, grant_for_v2
from pgws.envelope import NOTIFY_PAYLOAD_LIMIT, EnvelopeWriter
from pgws.errors import Forbidden
from pgws.protocols import v2

pytestmark = pytest.mark.nodb

AT = 1_732_780_000.125


def grant(mode: Mode = "rw", allowed: tuple[str, ...] = ("chat", "room:*")) -> Grant:
    """A v2 grant as a first `auth` would make it."""
    claims: dict[str, Any] = {"mode": mode, "channels": list(allowed)}
    return grant_for_v2(claims)


def receive(
    frame: str | bytes,
    granted: Grant | None = None,
    subscribed: tuple[str, ...] = (),
    now: float = AT,
) -> list[v2.Action]:
    granted = grant() if granted is None else granted
    return v2.receive(granted, subscribed, EnvelopeWriter(granted.claims, sender="s1"), frame, now)


def reply(actions: list[v2.Action]) -> dict[str, Any]:
    """The one reply frame of `actions`, parsed."""
    [action] = actions
    assert isinstance(action, v2.Reply), actions
    value: dict[str, Any] = json.loads(action.text)
    return value


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
    max_leaves=10,
)
REQUESTS = st.fixed_dictionaries(
    {"op": st.sampled_from([*sorted(v2.OPS), "nope"]) | JSON},
    optional={
        "ref": JSON,
        "ch": st.sampled_from(["chat", "room:1", "rooms", "other", ""]) | JSON,
        "data": JSON,
        "token": JSON,
        "echo": JSON,
        "from": JSON,
    },
)
FRAMES = st.text() | st.binary() | REQUESTS.map(json.dumps) | JSON.map(json.dumps)


def well_formed(actions: list[v2.Action]) -> None:
    assert actions
    assert all(isinstance(a, v2.Action) for a in actions)
    for action in actions:
        if isinstance(action, v2.Reply):
            frame = json.loads(action.text)
            assert frame["op"] in {"ok", "err", "pong"}
            if frame["op"] == "err":
                assert frame["code"] in {400, 401, 403, 404, 409, 413}
                assert isinstance(frame["reason"], str)
                assert frame["retry"] is False
        elif isinstance(action, v2.Close):
            assert action.code in {v2.AUTH_FAILED, v2.EXPIRED}
        elif isinstance(action, v2.Publish):
            assert json.loads(action.envelope)["channel"] == action.channel


@given(FRAMES, st.booleans(), st.sampled_from(["r", "w", "rw"]))
def test_any_frame_gives_well_formed_actions_and_never_raises(
    frame: str | bytes, authed: bool, mode: Mode
) -> None:
    granted = grant(mode)
    actions = v2.receive(
        granted if authed else None,
        ("chat",),
        EnvelopeWriter(granted.claims) if authed else None,
        frame,
        AT,
    )
    well_formed(actions)


@given(st.text().filter(lambda t: not _is_object_with_op(t)) | st.binary())
def test_a_malformed_frame_gets_err_400_and_never_a_close(frame: str | bytes) -> None:
    assert reply(receive(frame))["code"] == 400
    assert reply(v2.receive(None, (), None, frame, AT))["code"] == 400


def _is_object_with_op(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and isinstance(value.get("op"), str)


@pytest.mark.parametrize(
    "frame",
    [
        "not json",
        "[1]",
        '"op"',
        "{}",
        '{"op":1}',
        '{"op":"sub"}',
        '{"op":"sub","ch":1}',
        '{"op":"sub","ch":""}',
        '{"op":"sub","ch":"chat","echo":"no"}',
        '{"op":"sub","ch":"chat","from":null}',
        '{"op":"pub","ch":"chat"}',
        '{"op":"auth","token":5}',
        '{"op":"ping","ref":true}',
        '{"op":"ping","ref":1.5}',
        '{"op":"pub","ch":"chat","data":NaN}',
        '{"op":"pub","ch":"chat","data":1e400}',
    ],
)
def test_malformed_requests_are_400(frame: str) -> None:
    assert reply(receive(frame))["code"] == 400


def test_an_unknown_op_is_404_with_its_ref() -> None:
    assert reply(receive('{"op":"subscribe","ref":"a"}')) == {
        "op": "err",
        "ref": "a",
        "code": 404,
        "reason": "unknown op",
        "retry": False,
    }


def test_ping_is_pong_with_the_exact_ref() -> None:
    assert receive('{"op":"ping","ref":7}') == [v2.Reply('{"op":"pong","ref":7}')]
    assert receive('{"op":"ping"}') == [v2.Reply('{"op":"pong"}')]


def test_sub_needs_read_and_a_granted_channel() -> None:
    assert receive('{"op":"sub","ch":"room:1","ref":1}') == [v2.Subscribe("room:1", True, False, 1)]
    assert reply(receive('{"op":"sub","ch":"rooms"}'))["code"] == 403
    assert reply(receive('{"op":"sub","ch":"chat"}', grant("w")))["code"] == 403
    assert receive('{"op":"sub","ch":"chat","echo":false,"from":3}') == [
        v2.Subscribe("chat", False, True, None, "3")
    ]


def test_sub_twice_and_unsub_of_nothing_are_409() -> None:
    assert reply(receive('{"op":"sub","ch":"chat"}', subscribed=("chat",)))["code"] == 409
    assert reply(receive('{"op":"unsub","ch":"chat"}'))["code"] == 409
    assert receive('{"op":"unsub","ch":"chat"}', subscribed=("chat",)) == [
        v2.Unsubscribe("chat", None)
    ]


def test_pub_builds_the_spec_3_envelope_with_the_sender() -> None:
    [action] = receive('{"op":"pub","ch":"room:2","data":{"a":[1,2]},"ref":"x"}')
    assert isinstance(action, v2.Publish)
    assert action.ref == "x"
    assert action.channel == "room:2"
    envelope = json.loads(action.envelope)
    assert envelope["event"] == "WebsocketMessage"
    assert envelope["payload"] == '{"a":[1,2]}'
    assert envelope["sender"] == "s1"
    [text] = receive('{"op":"pub","ch":"chat","data":"hi"}')
    assert isinstance(text, v2.Publish)
    assert json.loads(text.envelope)["payload"] == "hi"


def test_pub_needs_write_and_fits_notify() -> None:
    assert reply(receive('{"op":"pub","ch":"chat","data":1}', grant("r")))["code"] == 403
    assert reply(receive('{"op":"pub","ch":"nope","data":1}'))["code"] == 403
    big = json.dumps({"op": "pub", "ch": "chat", "data": "x" * NOTIFY_PAYLOAD_LIMIT})
    assert reply(receive(big))["code"] == 413


def test_before_auth_only_auth_is_taken() -> None:
    assert v2.receive(None, (), None, '{"op":"auth","token":"t","ref":1}', AT) == [
        v2.Authenticate("t", 1)
    ]
    actions = v2.receive(None, (), None, '{"op":"sub","ch":"chat"}', AT)
    assert json.loads(actions[0].text)["code"] == 401  # type: ignore[union-attr]
    assert actions[1] == v2.Close(4401, "auth required")


def test_after_exp_every_frame_closes_3001() -> None:
    expired = grant_for_v2({"mode": "rw", "exp": AT - 1})
    assert receive('{"op":"ping"}', expired) == [v2.Close(3001, "JWT expired", at_once=True)]


def test_server_frames_are_exact_json() -> None:
    assert v2.ok(1, ch="a", recovered=False) == '{"op":"ok","ref":1,"ch":"a","recovered":false}'
    assert v2.err("r", 503, "database unavailable", retry=True) == (
        '{"op":"err","ref":"r","code":503,"reason":"database unavailable","retry":true}'
    )
    assert v2.gap("a") == '{"op":"gap","ch":"a"}'
    assert v2.expiring(59.9) == '{"op":"expiring","in":59}'
    assert v2.msg("a", '{"x": 1}', True) == '{"op":"msg","ch":"a","data":{"x": 1}}'
    assert v2.msg("a", "plain", False) == '{"op":"msg","ch":"a","data":"plain"}'
    granted = grant_for_v2({"mode": "r", "exp": 5, "channels": ["a"]})
    assert v2.auth_ok(2, granted, ["b"]) == (
        '{"op":"ok","ref":2,"mode":"r","exp":5,"dropped":["b"]}'
    )


@given(st.text(), st.text(), st.booleans())
def test_msg_is_json_and_carries_the_payload(channel: str, raw: str, as_json: bool) -> None:
    text = json.dumps(raw) if as_json else raw
    frame = json.loads(v2.msg(channel, text, as_json))
    assert frame == {"op": "msg", "ch": channel, "data": raw}


def test_refresh_drops_what_is_no_longer_granted() -> None:
    narrower = grant_for_v2({"mode": "r", "channels": ["room:*"]})
    assert v2.dropped(narrower, ["chat", "room:1", "rooms"]) == ["chat", "rooms"]
    assert v2.dropped(grant_for_v2({"mode": "w"}), ["a"]) == ["a"]


def test_wildcards_grant_a_family_of_channels() -> None:
    assert channel_granted(("room:*",), "room:1")
    assert not channel_granted(("room:*",), "rooms")
    assert channel_granted((), "anything")
    assert channel_granted(("a", "b"), "b")
    assert not channel_granted(("a",), "ab")


def test_legacy_path_channels_take_wildcards_and_never_subscribe_one() -> None:
    claims = {"mode": "r", "channels": ["room:*", "lobby"]}
    assert grant_for(claims, "room:7").channels == ("room:7",)
    assert grant_for(claims, None).channels == ("lobby",)
    with pytest.raises(Forbidden):
        grant_for(claims, "rooms")
    with pytest.raises(Forbidden, match="no channels"):
        grant_for({"mode": "r", "channels": ["room:*"]}, None)


def test_sub_beyond_max_channels_is_403() -> None:
    granted = grant()
    actions = v2.receive(
        granted,
        ("chat",),
        EnvelopeWriter(granted.claims),
        '{"op":"sub","ch":"room:1"}',
        AT,
        max_channels=1,
    )
    assert reply(actions)["reason"] == "too many channels: at most 1"


def test_a_durable_msg_ends_with_its_position() -> None:
    """`pos` comes last in a durable message's `msg` frame; NOTIFY messages carry none."""
    assert v2.msg("c", '{"a":1}', True, "p:1") == '{"op":"msg","ch":"c","data":{"a":1},"pos":"p:1"}'
    assert v2.msg("c", "hi", False, "p:2") == '{"op":"msg","ch":"c","data":"hi","pos":"p:2"}'
    assert v2.msg("c", "hi", False) == '{"op":"msg","ch":"c","data":"hi"}'
