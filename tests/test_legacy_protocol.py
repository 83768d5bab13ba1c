"""The legacy wire protocol as a pure function: frame and grant in, well-formed actions out."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgws.claims import Grant, Mode
from pgws.envelope import NOTIFY_PAYLOAD_LIMIT, EnvelopeWriter
from pgws.errors import MessageTooBig
from pgws.protocols import legacy

pytestmark = pytest.mark.nodb

AT = 1_732_780_000.125


def grant(
    mode: Mode = "rw",
    channels: tuple[str, ...] = ("chat",),
    expires_at: float | None = None,
    claims: dict[str, Any] | None = None,
) -> Grant:
    """A grant as the handshake would hand it over."""
    return Grant(channels, mode, {"mode": mode} if claims is None else claims, expires_at)


def receive(granted: Grant, frame: str | bytes, now: float = AT) -> list[legacy.Action]:
    """The actions for one frame, with the grant's own envelope writer."""
    return legacy.receive(granted, EnvelopeWriter(granted.claims), frame, now)


def test_a_writer_frame_is_one_envelope_per_channel_in_grant_order() -> None:
    """SPEC 3: each text frame becomes, for every granted channel, one WebsocketMessage."""
    actions = receive(grant(channels=("chat", "news")), "hello")
    assert actions == [
        legacy.Publish(
            "chat",
            '{"event":"WebsocketMessage","channel":"chat","payload":"hello",'
            '"claims":{"mode":"rw","message_delivered_at":1732780000.125}}',
        ),
        legacy.Publish(
            "news",
            '{"event":"WebsocketMessage","channel":"news","payload":"hello",'
            '"claims":{"mode":"rw","message_delivered_at":1732780000.125}}',
        ),
    ]


def test_a_binary_frame_is_published_as_its_utf8_text() -> None:
    """A binary frame holding UTF-8 is carried as that text, the same bytes as a text frame."""
    assert receive(grant(), "snow \u2603".encode()) == receive(grant(), "snow \u2603")


def test_a_binary_frame_that_is_not_utf8_closes_1003() -> None:
    """Binary that is not UTF-8 cannot be a JSON string: the socket is closed 1003."""
    assert receive(grant(), b"\xff\xfe") == [legacy.Close(1003, "binary frames must be UTF-8 text")]


@pytest.mark.parametrize("frame", ["hello", b"hello", "\u2603", b"\xff"])
def test_a_read_only_socket_frame_is_ignored_and_sized_as_sent(frame: str | bytes) -> None:
    """SPEC 3: mode r drops frames; their size (UTF-8 bytes) is what the read-only budget counts."""
    sent = frame if isinstance(frame, bytes) else frame.encode()
    assert receive(grant("r"), frame) == [legacy.Ignore(len(sent))]


def test_a_frame_at_or_after_exp_fails_the_socket_with_3001() -> None:
    """SPEC 3: once `exp` has passed nothing more is published, and the close does not wait."""
    expired = [legacy.Close(3001, "JWT expired", at_once=True)]
    assert receive(grant(expires_at=AT), "late", now=AT) == expired
    assert receive(grant(expires_at=AT), "late", now=AT + 1) == expired
    assert receive(grant(expires_at=AT + 1), "in time", now=AT) == receive(grant(), "in time")


def test_an_envelope_too_big_for_notify_refuses_after_the_channels_before_it() -> None:
    """A channel whose envelope passes 8000 bytes is refused (1009); earlier ones still go."""
    long_channel = "c" * 200
    payload = "x" * (NOTIFY_PAYLOAD_LIMIT - 250)
    actions = receive(grant(channels=("a", long_channel, "b")), payload)
    assert [type(action) for action in actions] == [legacy.Publish, legacy.Refuse]
    refused = actions[1]
    assert isinstance(refused, legacy.Refuse)
    assert isinstance(refused.error, MessageTooBig)
    assert refused.code == 1009
    assert refused.reason.startswith("message too big")


MODES: tuple[Mode, ...] = ("r", "w", "rw")
CHANNELS = st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=5, unique=True)
CLAIMS = st.dictionaries(
    st.text(max_size=10),
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.text(max_size=20),
    max_size=5,
)
NOW = st.floats(min_value=0, max_value=4e9, allow_nan=False)


@given(
    st.sampled_from(MODES),
    CHANNELS,
    st.none() | NOW,
    CLAIMS,
    st.text(max_size=9000) | st.binary(max_size=9000),
    NOW,
)
def test_any_frame_and_grant_give_well_formed_actions(
    mode: Mode,
    channels: list[str],
    expires_at: float | None,
    claims: dict[str, Any],
    frame: str | bytes,
    now: float,
) -> None:
    """Any frame under any grant never raises; at most one closing action, and it comes last."""
    granted = grant(mode, tuple(channels), expires_at, claims)
    actions = receive(granted, frame, now)
    assert actions
    closing = [a for a in actions if isinstance(a, legacy.Close | legacy.Refuse)]
    assert len(closing) <= 1
    if closing:
        assert actions[-1] is closing[0]
    if not granted.can_write:
        assert len(actions) == 1
        assert isinstance(actions[0], legacy.Ignore)
        assert actions[0].size >= len(frame)
        return
    text = frame.decode(errors="replace") if isinstance(frame, bytes) else frame
    published = [a for a in actions if isinstance(a, legacy.Publish)]
    assert [a.channel for a in published] == channels[: len(published)]
    for action in published:
        envelope = json.loads(action.envelope)
        assert envelope["event"] == "WebsocketMessage"
        assert envelope["channel"] == action.channel
        assert envelope["payload"] == text
        assert envelope["claims"]["message_delivered_at"] == now
        assert len(action.envelope.encode()) <= NOTIFY_PAYLOAD_LIMIT
    if published and expires_at is not None:
        assert now < expires_at
