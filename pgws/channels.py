"""Channel names: which names may be channels, and which names a token's `channels` grant.

One rule for every way a name arrives (a path, a claim, a v2 frame): channel names reach log lines,
envelopes and the database.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

from pgws.limits import MAX_CHANNEL_BYTES

# Bidi formatting characters (ALM, LRM, RLM, LRE..RLO, LRI..PDI): they make a channel name print
# as another one in logs and dashboards.
_BIDI_CONTROLS = frozenset(
    [
        "\u061c",
        "\u200e",
        "\u200f",
        *map(chr, range(0x202A, 0x202F)),
        *map(chr, range(0x2066, 0x206A)),
    ]
)


def channel_problem(name: str) -> str | None:
    """Why `name` cannot be a channel, or None: one rule for path channels and claimed ones.

    Channel names reach log lines, envelopes and the database, so each must be valid Unicode that
    encodes to UTF-8 (no lone surrogates, which JSON claims can carry), printable as itself (no
    control or bidi formatting characters) and short.
    """
    if not name:
        return "empty channel name"
    if any(0xD800 <= ord(char) <= 0xDFFF for char in name):
        return "the channel name is not valid Unicode"
    if any(unicodedata.category(char) == "Cc" for char in name):
        return "control characters in the channel name"
    if any(char in _BIDI_CONTROLS for char in name):
        return "bidi control characters in the channel name"
    if len(name.encode()) > MAX_CHANNEL_BYTES:
        return f"channel names are at most {MAX_CHANNEL_BYTES} bytes"
    return None


def is_wildcard(entry: str) -> bool:
    """Whether a `channels` entry is a wildcard: it ends in `*` (SPEC 8)."""
    return entry.endswith("*")


def channel_granted(allowed: Sequence[str], channel: str) -> bool:
    """Whether a token naming `allowed` grants `channel` (SPEC 2 rule 4 and SPEC 8).

    Nothing named grants everything; `room:*` grants every name starting with `room:` (`room:1`,
    not `rooms`); any other entry grants exactly itself.
    """
    if not allowed:
        return True
    for entry in allowed:
        if entry == channel or (is_wildcard(entry) and channel.startswith(entry[:-1])):
            return True
    return False
