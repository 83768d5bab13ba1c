"""The SPEC 2 request-path grammar (pgws/paths.py): accepted shapes, refusals, round trips."""

from __future__ import annotations

import urllib.parse

import pytest
from hypothesis import given

from pgws.errors import BadRequest
from pgws.limits import MAX_CHANNEL_BYTES
from pgws.paths import parse_path
from tests.test_claims import channel_names


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/tok", (None, "tok")),
        ("/tok?x=1", (None, "tok")),
        ("/tok/", (None, "tok")),
        ("/tok/?a=/b/c", (None, "tok")),
        ("/chat/tok", ("chat", "tok")),
        ("/chat/tok?x=/y/z", ("chat", "tok")),
        ("/chat/tok/", ("chat", "tok")),
        ("/room%201/tok", ("room 1", "tok")),
        ("/a%2Fb/tok", ("a/b", "tok")),
        ("/caf%C3%A9/tok", ("café", "tok")),
        ("/" + "a" * MAX_CHANNEL_BYTES + "/tok", ("a" * MAX_CHANNEL_BYTES, "tok")),
        ("/" + "é" * 31 + "a/tok", ("é" * 31 + "a", "tok")),
    ],
)
def test_parse_path_accepts(path: str, expected: tuple[str | None, str]) -> None:
    """Well-formed paths split into (channel or None, token), percent-decoded, query ignored."""
    assert parse_path(path) == expected


@pytest.mark.parametrize(
    "path",
    [
        "/a/b/c",
        "/a/b/c/",
        "tok",
        "",
        "/%ff/tok",
        "/%c3/tok",
        "/%00/tok",
        "/%0a/tok",
        "/a%7fb/tok",
        "/a\tb/tok",
        "//tok",
        "/" + "a" * (MAX_CHANNEL_BYTES + 1) + "/tok",
        "/" + "é" * 32 + "/tok",
    ],
)
def test_parse_path_rejects_malformed(path: str) -> None:
    """Malformed paths (shape, encoding, control characters, empty or long names) give 400."""
    with pytest.raises(BadRequest) as caught:
        parse_path(path)
    assert caught.value.status == 400


@given(channel_names)
def test_quoted_channel_names_round_trip(name: str) -> None:
    """Any valid channel name, percent-encoded into the path, comes back unchanged."""
    assert parse_path("/" + urllib.parse.quote(name, safe="") + "/tok.en.x") == (name, "tok.en.x")
