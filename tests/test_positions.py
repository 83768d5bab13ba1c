"""Durable positions: pure make/parse, never raising on any input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgws.positions import MAX_POSITION_BYTES, Position, make_position, parse_position

pytestmark = pytest.mark.nodb

hex8 = st.text(alphabet="0123456789abcdef", min_size=8, max_size=8)
offsets = st.integers(min_value=1, max_value=2**63 - 1)


@given(st.text())
def test_parse_position_never_raises_on_any_text(text: str) -> None:
    parsed = parse_position(text)
    assert parsed is None or str(parsed) == text


@given(hex8, hex8, offsets, hex8)
def test_a_made_position_parses_back_and_fits_64_bytes(
    channel_hash: str, epoch: str, offset: int, tag: str
) -> None:
    text = make_position(channel_hash, epoch, offset, tag)
    assert len(text.encode()) <= MAX_POSITION_BYTES
    assert parse_position(text) == Position(channel_hash, epoch, offset, tag)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0cc175b9:83c5b05d:1",
        "0cc175b9:83c5b05d:0:54430192",  # offsets start at 1
        "0cc175b9:83c5b05d:01:54430192",
        "0cc175b9:83c5b05d:-1:54430192",
        f"0cc175b9:83c5b05d:{2**63}:54430192",  # past bigint
        "0CC175B9:83c5b05d:1:54430192",
        "0cc175b9:83c5b05d:1:54430192\n",
        "0cc175b9:83c5b05d:\u0661:54430192",  # a non-ASCII digit
        "0cc175b9:83c5b05d:1:54430192:extra",
    ],
)
def test_malformed_positions_parse_to_none(text: str) -> None:
    assert parse_position(text) is None


def test_non_strings_parse_to_none() -> None:
    assert parse_position(None) is None  # type: ignore[arg-type]
