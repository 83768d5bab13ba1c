"""Compact JWS tokens, read without jose: their shape, their JSON parts, the HMAC fast path.

Everything here answers None (or False) for what it cannot read, so `claims` turns every
failure into the same `invalid token`. The HMAC check accepts exactly the tokens jose's
`jws.verify` accepts (tests/test_claims_fast.py) without jose's key lookups per call.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Callable
from typing import Any

from pgws.envelope import strict_loads
from pgws.keys import Key

# Far above any real token, far below what would let a client make us do real work.
MAX_TOKEN_LENGTH = 8192
_TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# Deeper than any real JOSE header or claims set; bounds what may later be walked or re-serialised
# (jose and the envelope writer recurse) so a hostile token is an `invalid token`, not a crash.
MAX_JSON_DEPTH = 32


def token_shaped(value: str) -> bool:
    """Whether `value` has a JWT's compact shape (three base64url parts, the first one a JSON
    object), without verifying it. The JSON check keeps dotted subprotocol names such as
    `wamp.2.json` from being taken for tokens, as the original never did."""
    if len(value) > MAX_TOKEN_LENGTH or _TOKEN_SHAPE.fullmatch(value) is None:
        return False
    header = value.partition(".")[0]
    try:
        decoded = base64.urlsafe_b64decode(header + "=" * (-len(header) % 4))
    except (binascii.Error, ValueError):
        return False
    return decoded.lstrip().startswith(b"{")


_HMAC_HASHES: dict[str, Callable[[], Any]] = {
    "HS256": hashlib.sha256,
    "HS384": hashlib.sha384,
    "HS512": hashlib.sha512,
}


def hmac_of(key: Key) -> tuple[bytes, Callable[[], Any]] | None:
    """(secret, hash) of an HMAC key, if hmac and jose sign alike with it; else None (use jose)."""
    digest = _HMAC_HASHES.get(key.algorithm)
    secret = getattr(key.key, "prepared_key", None)
    if digest is None or not isinstance(secret, bytes):
        return None
    probe = b"pgws: do hmac and jose agree?"
    try:
        agrees = key.key.sign(probe) == hmac.new(secret, probe, digest).digest()
    except Exception:  # noqa: BLE001  # anything odd about this key: leave it to jose
        return None
    return (secret, digest) if agrees else None


def hmac_payload(token: str, secret: bytes, digest: Callable[[], Any]) -> bytes | None:
    """The payload bytes of a compact JWS whose HMAC signature holds, or None.

    For a token that is `token_shaped` and whose header names this key's algorithm, it answers
    as jose's `jws.verify` does (same base64url decoding of each part, same HMAC over the first
    two parts, compared in constant time), without jose's key lookups per call.
    """
    signing_input, _, signature_segment = token.rpartition(".")
    signature = b64url_decode(signature_segment)
    if signature is None:
        return None
    expected = hmac.new(secret, signing_input.encode("ascii"), digest).digest()
    if not hmac.compare_digest(signature, expected):
        return None
    return b64url_decode(signing_input.partition(".")[2])


def utf8(data: bytes | None) -> str | None:
    """`data` as UTF-8 text, as jose reads a token's parts; None if it is not."""
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def token_json(data: bytes | str | None) -> dict[str, Any] | None:
    """A JOSE header or claims set: a JSON object pgws can carry, or None (`invalid token`).

    Refused: nesting deeper than MAX_JSON_DEPTH, and numbers that are not finite (`NaN`,
    `Infinity`, or `1e400`, which Python reads as inf): no envelope could carry them as JSON.
    """
    if data is None:
        return None
    try:
        value = strict_loads(data)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    if not isinstance(value, dict):
        return None
    # Each level of nesting takes a bracket: with few brackets in all there is nothing to walk.
    if isinstance(data, bytes):  # in UTF-16 or -32 too, every bracket holds its ASCII byte
        brackets = data.count(b"[") + data.count(b"{")
    else:
        brackets = data.count("[") + data.count("{")
    if brackets > MAX_JSON_DEPTH and not _nesting_within(value, MAX_JSON_DEPTH):
        return None
    return value


def _nesting_within(value: Any, limit: int) -> bool:
    """Whether no list or object in `value` sits deeper than `limit` (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return False
        stack.extend((child, depth + 1) for child in children)
    return True


def b64url_decode(segment: str) -> bytes | None:
    """A base64url part of a token (padding optional), or None if it does not decode."""
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        return None
