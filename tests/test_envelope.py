"""Outgoing envelopes (shape, escaping, the NOTIFY size limit) and routing of incoming ones."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgws.envelope import NOTIFY_PAYLOAD_LIMIT, EnvelopeWriter, route_channel
from pgws.errors import MessageRefused, MessageTooBig

pytestmark = pytest.mark.nodb

AT = 1_732_780_000.125
CLAIMS = {"mode": "rw", "channels": ["chat", "news"], "sub": "u1", "exp": 1_900_000_000}


def size(text: str) -> int:
    """Bytes on the wire, as PostgreSQL counts them."""
    return len(text.encode())


def build(payload: str, claims: dict[str, Any] | None = None) -> str:
    """An envelope for `payload` on channel `chat`."""
    writer = EnvelopeWriter(CLAIMS if claims is None else claims)
    return writer.build("WebsocketMessage", "chat", payload, AT)


def test_envelope_shape_and_key_order() -> None:
    """The envelope is exactly event, channel, payload, claims; claims end with the server time."""
    text = build("hello")
    envelope = json.loads(text)
    assert envelope == {
        "event": "WebsocketMessage",
        "channel": "chat",
        "payload": "hello",
        "claims": {**CLAIMS, "message_delivered_at": AT},
    }
    assert list(envelope) == ["event", "channel", "payload", "claims"]
    assert list(envelope["claims"]) == [*CLAIMS, "message_delivered_at"]
    assert isinstance(envelope["claims"]["message_delivered_at"], float)


def test_envelope_is_compact() -> None:
    """The envelope carries no whitespace between tokens (every byte counts towards 8000)."""
    text = EnvelopeWriter({"mode": "r"}).build("E", "c", "p", 1.5)
    assert text == (
        '{"event":"E","channel":"c","payload":"p","claims":{"mode":"r","message_delivered_at":1.5}}'
    )


def test_empty_claims_still_carry_delivered_at() -> None:
    """With no claims at all, `claims` holds just the server's timestamp."""
    assert json.loads(build("x", {}))["claims"] == {"message_delivered_at": AT}


@pytest.mark.parametrize("position", ["first", "last"])
def test_token_claim_delivered_at_is_replaced(position: str) -> None:
    """A token claim named message_delivered_at is dropped in favour of the server's time."""
    forged = {"message_delivered_at": 1.0}
    claims = {**forged, "mode": "r"} if position == "first" else {"mode": "r", **forged}
    text = build("x", claims)
    assert text.count("message_delivered_at") == 1
    assert json.loads(text)["claims"] == {"mode": "r", "message_delivered_at": AT}


@pytest.mark.parametrize(
    "payload",
    [
        'say "hi"',
        "back\\slash\\",
        "line\nbreak\r\n\ttab",
        "nul\x00byte",
        "\x01\x1f\x7f",
        "emoji 🎉👩‍👩‍👧 and é",
        "</script><script>",
        "\u2028\u2029",
        '{"channel":"other"}',
        "",
    ],
)
def test_payload_round_trips(payload: str) -> None:
    """Any frame text, escaped in the envelope, comes back identical from json.loads."""
    assert json.loads(build(payload))["payload"] == payload


def test_event_and_channel_are_escaped() -> None:
    """Event and channel names with quotes or newlines stay inside their JSON strings."""
    text = EnvelopeWriter({}).build('ev"ent', 'ch"an\nnel', "p", AT)
    envelope = json.loads(text)
    assert (envelope["event"], envelope["channel"]) == ('ev"ent', 'ch"an\nnel')


def test_huge_integer_claims_still_serialise() -> None:
    """Claims with integers beyond 64 bits are serialised exactly."""
    claims = {"mode": "r", "big": 2**70, "neg": -(2**100), "emoji": "🎉"}
    assert json.loads(build("x", claims))["claims"] == {**claims, "message_delivered_at": AT}


def test_lone_surrogate_claims_still_serialise() -> None:
    """A claim holding a lone surrogate (a legal JSON escape in a token) gives UTF-8-safe text."""
    claims = {"mode": "r", "odd": "a\ud800b", "channels": ["\udfff"]}
    text = build("x", claims)
    text.encode()  # must not raise
    assert json.loads(text)["claims"] == {**claims, "message_delivered_at": AT}


def test_non_finite_delivered_at_is_a_programming_error() -> None:
    """A NaN timestamp is refused rather than written as invalid JSON."""
    with pytest.raises(ValueError, match="finite"):
        EnvelopeWriter({}).build("e", "c", "p", float("nan"))


def overhead() -> int:
    """Bytes of the envelope around an empty payload."""
    return size(build(""))


def test_envelope_exactly_at_the_limit_is_accepted() -> None:
    """An envelope of exactly 7999 bytes is built."""
    text = build("a" * (NOTIFY_PAYLOAD_LIMIT - overhead()))
    assert size(text) == NOTIFY_PAYLOAD_LIMIT == 7999


def test_envelope_one_byte_over_the_limit_is_too_big() -> None:
    """An envelope of 8000 bytes raises MessageTooBig, which closes the socket with 1009."""
    with pytest.raises(MessageTooBig) as caught:
        build("a" * (NOTIFY_PAYLOAD_LIMIT - overhead() + 1))
    assert caught.value.close_code == 1009
    assert isinstance(caught.value, MessageRefused)
    assert str(caught.value).startswith("message too big")


def test_limit_counts_utf8_bytes() -> None:
    """Multi-byte characters count in bytes: fewer than 7999 characters can be too big."""
    room = NOTIFY_PAYLOAD_LIMIT - overhead()
    fits = "é" * (room // 2) + "a" * (room % 2)
    assert size(build(fits)) == NOTIFY_PAYLOAD_LIMIT
    too_big = "é" * (room // 2 + 1)
    assert len(build("")) + len(too_big) < NOTIFY_PAYLOAD_LIMIT
    with pytest.raises(MessageTooBig):
        build(too_big)


def test_limit_counts_escapes() -> None:
    """Characters that JSON escapes count with their escape: a quote costs two bytes."""
    room = NOTIFY_PAYLOAD_LIMIT - overhead()
    assert size(build('"' * (room // 2) + "a" * (room % 2))) == NOTIFY_PAYLOAD_LIMIT
    with pytest.raises(MessageTooBig):
        build('"' * (room // 2 + 1))


def test_four_byte_characters_at_the_limit() -> None:
    """A payload of 4-byte characters filling the limit exactly is accepted; one more is not."""
    room = NOTIFY_PAYLOAD_LIMIT - overhead()
    fits = "🎉" * (room // 4) + "a" * (room % 4)
    assert size(build(fits)) == NOTIFY_PAYLOAD_LIMIT
    with pytest.raises(MessageTooBig):
        build(fits + "a")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('{"channel":"chat","payload":"hi"}', "chat"),
        ('  {"event":"x", "channel":"room 1"}\n', "room 1"),
        ('{"channel":""}', ""),
        ('{"channel":"é🎉"}', "é🎉"),
        ('{"channel":"a","n":1' + "0" * 400 + "}", "a"),
        ('{"channel":"a","nested":{"channel":"b"}}', "a"),
        ("", None),
        ("hello", None),
        ("{not json", None),
        ('{"channel":"a"', None),
        ('["channel","a"]', None),
        ('[{"channel":"a"}]', None),
        ("42", None),
        ('"chat"', None),
        ("null", None),
        ("{}", None),
        ('{"channel":1}', None),
        ('{"channel":null}', None),
        ('{"channel":["a"]}', None),
        ('{"channel":{"name":"a"}}', None),
        ('{"nested":{"channel":"a"}}', None),
        ("[" * 100_000, None),
    ],
    ids=lambda value: repr(value)[:40],
)
def test_route_channel(raw: str, expected: str | None) -> None:
    """Only a JSON object's own string `channel` routes; anything else gives None."""
    assert route_channel(raw) == expected


# Any code point, with the awkward ones (lone surrogates, escapes, multi-byte) made common; built
# from a list because st.text() silently drops surrogates from its alphabet.
AWKWARD = st.sampled_from(["\ud800", "\udfff", '"', "\\", "\x00", "é", "🎉"])
ANY_TEXT = st.lists(st.characters() | AWKWARD).map("".join)


@given(ANY_TEXT)
def test_any_payload_builds_or_is_too_big(payload: str) -> None:
    """Any text payload builds an envelope that round-trips it, or raises MessageTooBig."""
    try:
        text = build(payload)
    except MessageTooBig:
        assert size(build("")) + len(payload) > NOTIFY_PAYLOAD_LIMIT
    else:
        assert size(text) <= NOTIFY_PAYLOAD_LIMIT
        # Valid Unicode comes back exactly; lone surrogates (never in a WebSocket text frame) come
        # back as JSON reads their escapes, which pairs adjacent high and low halves.
        assert json.loads(text)["payload"] == json.loads(json.dumps(payload))
        if all(not 0xD800 <= ord(char) <= 0xDFFF for char in payload):
            assert json.loads(text)["payload"] == payload


@given(
    ANY_TEXT | st.builds(lambda name: json.dumps({"channel": name}, ensure_ascii=False), ANY_TEXT)
)
def test_route_channel_never_raises(raw: str) -> None:
    """Any text routes to a string channel or to None; nothing escapes."""
    channel = route_channel(raw)
    assert channel is None or isinstance(channel, str)
