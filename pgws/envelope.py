"""The JSON envelopes that travel through PostgreSQL, in both directions.

Outgoing (client → database) envelopes are built by string concatenation around pieces that are
serialised once per connection, because this runs for every frame. Incoming notifications are never
re-serialised: only their routing channel is read, and the raw text is what clients receive.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from pgws.errors import MessageTooBig
from pgws.limits import NOTIFY_PAYLOAD_LIMIT

__all__ = [
    "NOTIFY_PAYLOAD_LIMIT",
    "EnvelopeWriter",
    "dump_json",
    "inspect_notification",
    "route_channel",
]

DELIVERED_AT = "message_delivered_at"
SENDER = "sender"  # SPEC 8: the extra key of a v2 writer's envelope


def dump_json(value: Any) -> str:
    """Serialise to compact JSON text; integers too large for orjson fall back to the stdlib."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # orjson.JSONEncodeError: integers beyond 64 bits, lone surrogates
        # ensure_ascii: a lone surrogate (legal in a token's JSON) must become an escape, or the
        # envelope could not be encoded as UTF-8.
        return json.dumps(value, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


class EnvelopeWriter:
    """Builds the envelopes one connection sends: `claims` is fixed, so it is serialised once."""

    __slots__ = ("_claims_head", "_limit", "_tail")

    def __init__(
        self,
        claims: Mapping[str, Any],
        *,
        sender: str | None = None,
        limit: Callable[[str], int] | None = None,
    ) -> None:
        # The largest envelope per channel: NOTIFY's, or a durable row's (Config.envelope_limit).
        self._limit = limit
        # The server's timestamp always wins over a claim of the same name in the token.
        kept = {key: value for key, value in claims.items() if key != DELIVERED_AT}
        head = dump_json(kept)[:-1]  # without the closing brace; the timestamp goes last
        self._claims_head = head + ("," if kept else "")
        # SPEC 8 echo: a v2 writer's envelopes carry one extra key naming the sending socket, so
        # delivery can skip that socket without rewriting the shared frame.
        self._tail = "}" if sender is None else f',"{SENDER}":{dump_json(sender)}}}'

    def build(self, event: str, channel: str, payload: str, delivered_at: float) -> str:
        """Return the envelope text; raise MessageTooBig when NOTIFY could not carry it."""
        if not math.isfinite(delivered_at):
            raise ValueError("delivered_at must be finite")
        text = (
            f'{{"event":{dump_json(event)},"channel":{dump_json(channel)},'
            f'"payload":{dump_json(payload)},"claims":{self._claims_head}'
            f'"{DELIVERED_AT}":{delivered_at!r}}}{self._tail}'
        )
        size = len(text) if text.isascii() else len(text.encode())
        limit = NOTIFY_PAYLOAD_LIMIT if self._limit is None else self._limit(channel)
        if size > limit:
            carrier = "NOTIFY" if limit == NOTIFY_PAYLOAD_LIMIT else "a durable message"
            raise MessageTooBig(
                f"message too big: the envelope is {size} bytes, {carrier} takes at most {limit}"
            )
        return text


def inspect_notification(raw: str) -> tuple[bool, str | None]:
    """For pgws.v2 delivery: whether `raw` is strict JSON (no NaN), and the v2 sender it names.

    Parsed once per notification, never per socket: the `msg` frame is then built around `raw`.
    """
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:  # numbers beyond a double are still JSON; NaN and Infinity are not
            value = json.loads(raw, parse_constant=_not_json)
        except (ValueError, RecursionError):
            return False, None
    sender = value.get(SENDER) if isinstance(value, dict) else None
    return True, sender if isinstance(sender, str) else None


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def route_channel(raw: str) -> str | None:
    """The channel a notification is addressed to: its JSON object's string `channel`, else None."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        # orjson refuses numbers beyond a double (e.g. a 400-digit PostgreSQL numeric), which
        # are still JSON; the stdlib parses them.
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):
            return None
    if isinstance(value, dict):
        channel = value.get("channel")
        if isinstance(channel, str):
            return channel
    return None


def strict_loads(data: str | bytes) -> Any:
    """json.loads refusing what JSON is not: NaN, Infinity, and numbers beyond a float (1e400).

    Raises ValueError (RecursionError for absurd nesting, as json.loads does).
    """
    # What json.loads does, with one decoder built once (json.loads builds one per call when
    # given hooks: a tenth of a token check).
    if isinstance(data, str):
        if data.startswith("\ufeff"):
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", data, 0)
    else:
        data = data.decode(json.detect_encoding(data), "surrogatepass")
    return _STRICT.decode(data)


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


_STRICT = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)
