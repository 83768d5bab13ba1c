"""Durable message positions: `hash:epoch:offset:tag`, an opaque string of at most 64 bytes.

`hash` names the channel (8 hex digits of md5), `epoch` its history (random, new after a reset),
`offset` the message's place in the channel (1, 2, ...) and `tag` the row (random, so that an
offset given out twice after a failover is not taken for the same message). Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import re

__all__ = ["MAX_POSITION_BYTES", "Position", "make_position", "parse_position"]

MAX_POSITION_BYTES = 64
_MAX_OFFSET = 2**63 - 1  # PostgreSQL bigint
_POSITION = re.compile(r"([0-9a-f]{8}):([0-9a-f]{8}):([1-9][0-9]{0,18}):([0-9a-f]{8})")


@dataclasses.dataclass(frozen=True, slots=True)
class Position:
    """A parsed position; `str()` gives the wire form back."""

    channel_hash: str
    epoch: str
    offset: int
    tag: str

    def __str__(self) -> str:
        return make_position(self.channel_hash, self.epoch, self.offset, self.tag)


def make_position(channel_hash: str, epoch: str, offset: int, tag: str) -> str:
    """The wire form, as pgws.store_many() builds it in SQL."""
    return f"{channel_hash}:{epoch}:{offset}:{tag}"


def parse_position(text: str) -> Position | None:
    """The position `text` names, or None when it is not one; never raises."""
    if not isinstance(text, str) or len(text) > MAX_POSITION_BYTES:
        return None
    match = _POSITION.fullmatch(text)
    if match is None:
        return None
    channel_hash, epoch, offset, tag = match.groups()
    if int(offset) > _MAX_OFFSET:
        return None
    return Position(channel_hash, epoch, int(offset), tag)
