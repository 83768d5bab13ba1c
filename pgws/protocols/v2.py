"""The `pgws.v2` wire protocol (SPEC 8), pure: one client frame in, the actions to take out.

Like the legacy protocol it does no I/O and has no clock of its own. What needs the outside world
(verifying a token, changing registry subscriptions, sending a NOTIFY) comes back as a request
action for the session; everything the frame alone decides (malformed, unknown op, not granted,
already subscribed, too big) comes back as a ready `err` frame. Server frames are built here as
exact JSON text; `msg` is concatenated around the raw notification so one frame serves every v2
socket of a channel.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable
from typing import Any

from pgws.claims import DEFAULT_MAX_CHANNELS, Grant, channel_problem
from pgws.envelope import EnvelopeWriter, dump_json, strict_loads
from pgws.errors import MessageTooBig

SUBPROTOCOL = "pgws.v2"
EXPIRED = 3001  # SPEC 3, kept by v2
AUTH_FAILED = 4401  # SPEC 8: the first `auth` failed or did not come in time
# SPEC 8 `err` codes, read like HTTP.
MALFORMED, BAD_TOKEN, NOT_GRANTED, UNKNOWN_OP, CONFLICT, TOO_BIG = 400, 401, 403, 404, 409, 413
TOO_MANY, UNAVAILABLE = 429, 503
OPS = frozenset({"auth", "sub", "unsub", "pub", "ping"})

Ref = int | str | None  # None: the request carried no `ref`, so the reply carries none


@dataclasses.dataclass(slots=True)
class Reply:
    """Send this text frame to the socket."""

    text: str


@dataclasses.dataclass(slots=True)
class Close:
    """Close the socket with `code` and `reason`; `at_once` fails it without waiting (3001)."""

    code: int
    reason: str
    at_once: bool = False


@dataclasses.dataclass(slots=True)
class Authenticate:
    """Verify `token`: a first auth, or a refresh of the socket's grant."""

    token: str
    ref: Ref


@dataclasses.dataclass(slots=True)
class Subscribe:
    """Add `channel` to the socket's subscriptions; reply `ok` (SPEC 8 `sub`)."""

    channel: str
    echo: bool
    resume: bool  # `from` was given: reply `recovered` (true only for an exact durable replay)
    ref: Ref
    position: str | None = None  # the `from` value as text (an integer can never resume)


@dataclasses.dataclass(slots=True)
class Unsubscribe:
    """Remove `channel` from the socket's subscriptions; reply `ok`."""

    channel: str
    ref: Ref


@dataclasses.dataclass(slots=True)
class Publish:
    """NOTIFY `envelope` (addressed to `channel`); reply `ok` once sent, `err 503` if it fails."""

    channel: str
    envelope: str
    ref: Ref


Action = Reply | Close | Authenticate | Subscribe | Unsubscribe | Publish


class _Malformed(ValueError):
    """A frame or field SPEC 8 cannot read: `err 400`, the socket stays open."""


def receive(
    grant: Grant | None,
    subscribed: Collection[str],
    writer: EnvelopeWriter | None,
    frame: str | bytes,
    now: float,
    *,
    max_channels: int = DEFAULT_MAX_CHANNELS,
) -> list[Action]:
    """The actions one client frame calls for, read at UNIX time `now`.

    `grant` is None until the first `auth` succeeded (then `writer` is None too); `subscribed`
    holds the socket's current channels, at most `max_channels` (PGWS_MAX_CHANNELS). Never
    raises: a frame it cannot read is `err 400`.
    """
    if grant is not None and grant.expires_at is not None and now >= grant.expires_at:
        return [Close(EXPIRED, "JWT expired", at_once=True)]  # as legacy: nothing after `exp`
    ref: Ref = None
    try:
        request = _parse(frame)
        ref = _ref(request)
        op = request["op"]
        if op not in OPS:
            return [Reply(err(ref, UNKNOWN_OP, "unknown op"))]
        if op == "auth":
            return [Authenticate(_string(request, "token"), ref)]
        if op == "ping":
            return [Reply(pong(ref))] if grant is not None else _unauthenticated(ref)
        if grant is None or writer is None:
            _check_fields(request, op)  # a malformed request is a 400 before it is a 401
            return _unauthenticated(ref)
        if op == "sub":
            return [_sub(grant, subscribed, request, ref, max_channels)]
        if op == "unsub":
            channel = _channel(request)
            if channel not in subscribed:
                return [Reply(err(ref, CONFLICT, "not subscribed"))]
            return [Unsubscribe(channel, ref)]
        return [_pub(grant, writer, request, ref, now)]
    except _Malformed as exc:
        return [Reply(err(ref, MALFORMED, str(exc)))]


def _sub(
    grant: Grant, subscribed: Collection[str], request: dict[str, Any], ref: Ref, max_channels: int
) -> Action:
    channel = _channel(request)
    echo = request.get("echo", True)
    if not isinstance(echo, bool):
        raise _Malformed("echo must be true or false")
    resume = "from" in request
    position: str | None = None
    if resume:
        given = request["from"]
        if isinstance(given, bool) or not isinstance(given, int | str):
            raise _Malformed("from must be a position")
        position = str(given)
    if not (grant.can_read and grant.allows(channel)):
        return Reply(err(ref, NOT_GRANTED, "channel not granted for reading"))
    if channel in subscribed:
        return Reply(err(ref, CONFLICT, "already subscribed"))
    if len(subscribed) >= max_channels:  # as at a legacy handshake: a bound on one socket's cost
        return Reply(err(ref, NOT_GRANTED, f"too many channels: at most {max_channels}"))
    return Subscribe(channel, echo, resume, ref, position)


def _pub(
    grant: Grant, writer: EnvelopeWriter, request: dict[str, Any], ref: Ref, now: float
) -> Action:
    channel = _channel(request)
    if "data" not in request:
        raise _Malformed("data is missing")
    data = request["data"]
    if not (grant.can_write and grant.allows(channel)):
        return Reply(err(ref, NOT_GRANTED, "channel not granted for writing"))
    payload = data if isinstance(data, str) else dump_json(data)
    try:
        envelope = writer.build("WebsocketMessage", channel, payload, now)
    except MessageTooBig as exc:
        return Reply(err(ref, TOO_BIG, str(exc)))
    return Publish(channel, envelope, ref)


def _unauthenticated(ref: Ref) -> list[Action]:
    """Anything but `auth` first: SPEC 8 treats it as a failed first auth (401, then 4401)."""
    return [Reply(err(ref, BAD_TOKEN, "authenticate first")), Close(AUTH_FAILED, "auth required")]


def _check_fields(request: dict[str, Any], op: str) -> None:
    if op in ("sub", "unsub", "pub"):
        _channel(request)


def _parse(frame: str | bytes) -> dict[str, Any]:
    if not isinstance(frame, str):
        raise _Malformed("frames must be text")
    try:
        value = strict_loads(frame)
    except (ValueError, RecursionError):
        raise _Malformed("not JSON") from None
    if not isinstance(value, dict):
        raise _Malformed("not an object")
    if not isinstance(value.get("op"), str):
        raise _Malformed("op must be a string")
    return value


def _ref(request: dict[str, Any]) -> Ref:
    if "ref" not in request:
        return None
    ref = request["ref"]
    if isinstance(ref, bool) or not isinstance(ref, int | str):
        raise _Malformed("ref must be an integer or a string")
    if isinstance(ref, str) and _not_unicode(ref):
        raise _Malformed("ref is not valid Unicode")
    return ref


def _string(request: dict[str, Any], field: str) -> str:
    value = request.get(field)
    if not isinstance(value, str):
        raise _Malformed(f"{field} must be a string")
    return value


def _channel(request: dict[str, Any]) -> str:
    channel = _string(request, "ch")
    problem = channel_problem(channel)
    if problem is not None:
        raise _Malformed(f"ch: {problem}")
    return channel


def _not_unicode(text: str) -> bool:
    return any(0xD800 <= ord(char) <= 0xDFFF for char in text)


# Server frames: exact JSON text, keys in the order SPEC 8 lists them.


def _head(op: str, ref: Ref) -> str:
    return f'{{"op":"{op}"' if ref is None else f'{{"op":"{op}","ref":{dump_json(ref)}'


def ok(ref: Ref, **fields: Any) -> str:
    """An `ok` reply, with the op's own fields (`ch`, `recovered`, `mode` …) in the given order."""
    return _head("ok", ref) + "".join(f',"{k}":{dump_json(v)}' for k, v in fields.items()) + "}"


def auth_ok(ref: Ref, grant: Grant, dropped: Iterable[str]) -> str:
    """The reply to an `auth` that held: mode, expiry (null: none) and the channels it ended."""
    exp = grant.claims.get("exp")
    return ok(ref, mode=grant.mode, exp=exp, dropped=list(dropped))


def err(ref: Ref, code: int, reason: str, *, retry: bool = False) -> str:
    """An `err` reply; `retry` says whether the same request may work later (429, 503)."""
    return (
        _head("err", ref)
        + f',"code":{code},"reason":{dump_json(reason)},"retry":{"true" if retry else "false"}}}'
    )


def pong(ref: Ref) -> str:
    """The reply to `ping`."""
    return _head("pong", ref) + "}"


def gap(channel: str) -> str:
    """Continuity of a live subscription on `channel` was lost: the client should reload."""
    return f'{{"op":"gap","ch":{dump_json(channel)}}}'


def expiring(seconds: float) -> str:
    """The token expires in `seconds` (whole seconds, rounded down, never negative)."""
    return f'{{"op":"expiring","in":{max(int(seconds), 0)}}}'


def msg(channel: str, raw: str, raw_is_json: bool, pos: str | None = None) -> str:
    """A `msg` frame for one notification, built once and shared by every v2 reader of `channel`.

    `data` is the raw text itself when it is JSON (concatenated, never parsed and dumped again),
    else that text as a JSON string; `pos` (durable messages only, SPEC 7) comes last.
    """
    data = raw if raw_is_json else dump_json(raw)
    tail = "}" if pos is None else f',"pos":{dump_json(pos)}}}'
    return f'{{"op":"msg","ch":{dump_json(channel)},"data":{data}{tail}'


def dropped(grant: Grant, subscribed: Iterable[str]) -> list[str]:
    """The subscriptions a new grant no longer covers (SPEC 8 refresh), in the given order."""
    return [ch for ch in subscribed if not (grant.can_read and grant.allows(ch))]
