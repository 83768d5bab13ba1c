"""`GET /events`: reading and checking the request (SPEC 9), before any stream exists.

The query (`ch`, `token`), the Accept and Authorization headers, the Last-Event-ID (a stream id
naming durable positions) → a `Plan`, answered with a `StreamResponse` that `sse.EventStreams`
starts; or a HandshakeRefused with its status.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Awaitable, Callable, Iterable
from http import HTTPStatus
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from pgws import web
from pgws.channels import channel_problem
from pgws.claims import Grant, Verifier, grant_for_v2
from pgws.config import Config
from pgws.errors import (
    BadRequest,
    Forbidden,
    HandshakeRefused,
    Unauthorized,
)

if TYPE_CHECKING:
    from pgws.sse import EventStreams

PATH = "/events"
MEDIA_TYPE = "text/event-stream"
# The first word of every stream id; a Last-Event-ID without it is not one of ours.
ID_PREFIX = "pgws"
_ACCEPTABLE = frozenset({MEDIA_TYPE, "text/*", "*/*"})


class NotAcceptable(HandshakeRefused):
    """The client's Accept header rules out text/event-stream."""

    status = 406


class MethodNotAllowed(HandshakeRefused):
    """/events answers GET only."""

    status = 405


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """An accepted /events request: what the stream reads and where it resumes from."""

    grant: Grant
    channels: tuple[str, ...]
    # None: no Last-Event-ID (a first connect); else the positions it named (() for an id
    # without any, and for one pgws cannot read: then `unreadable`, and every channel gaps).
    resume: tuple[str, ...] | None
    unreadable: bool = False


Starter = Callable[[ServerConnection, Response], Awaitable[Response]]


async def _not_started(connection: ServerConnection, response: Response) -> Response:
    return response


@dataclasses.dataclass
class StreamResponse(Response):
    """A 200 whose body is the event stream; `begin` starts it from process_response."""

    start: Starter = _not_started

    async def begin(self, connection: ServerConnection) -> Response:
        """Resume, write the head and hand the transport to a new EventStream; the response
        websockets is to send (this one, already written, or a 503 when resuming failed)."""
        return await self.start(connection, self)


def is_events_request(request: Request) -> bool:
    """Whether the request is for /events (query string aside)."""
    return request.path.split("?", 1)[0] == PATH


def read_query(path: str) -> tuple[tuple[str, ...], str | None]:
    """The channels (`ch`, in order, without duplicates) and the `token` a query names.

    Raises BadRequest for a query pgws cannot read (invalid percent-encoding, two tokens, a
    channel name SPEC 2 would refuse).
    """
    _, _, query = path.partition("?")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("bad request: the query is not valid percent-encoded UTF-8") from None
    channels: list[str] = []
    tokens = [value for key, value in pairs if key == "token"]
    if len(tokens) > 1:
        raise BadRequest("bad request: more than one token")
    for key, value in pairs:
        if key != "ch":
            continue
        problem = channel_problem(value)
        if problem is not None:
            raise BadRequest(f"bad request: ch: {problem}")
        if value not in channels:
            channels.append(value)
    return tuple(channels), tokens[0] if tokens else None


def stream_id(positions: Iterable[str]) -> str:
    """The `id:` of a stream: the prefix, then each durable channel's last position."""
    return " ".join((ID_PREFIX, *positions))


def read_stream_id(value: str, limit: int) -> tuple[str, ...] | None:
    """The positions a Last-Event-ID names, or None when it is not a pgws stream id."""
    words = value.split(" ")
    if words[0] != ID_PREFIX or len(words) - 1 > limit or "" in words[1:]:
        return None
    return tuple(words[1:])


def _accepts_event_stream(request: Request) -> bool:
    """Accept absent, or naming text/event-stream, text/* or */* (without q=0)."""
    values = request.headers.get_all("Accept")
    if not values:
        return True
    for value in values:
        for item in value.split(","):
            media, *params = (part.strip().lower() for part in item.split(";"))
            if media in _ACCEPTABLE and not any(_refused(param) for param in params):
                return True
    return False


def _refused(param: str) -> bool:
    """`q=0` (RFC 9110 12.4.2): the client does not accept that media type."""
    name, _, value = param.partition("=")
    if name.strip() != "q":
        return False
    try:
        return float(value) == 0.0
    except ValueError:
        return False


def _bearer(request: Request) -> str | None:
    for value in request.headers.get_all("Authorization"):
        scheme, _, credentials = value.strip().partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    return None


class EventsEndpoint:
    """Checks one /events request (after the handshake's origin and capacity checks)."""

    def __init__(
        self, config: Config, streams: EventStreams, clock: Callable[[], float] = time.time
    ) -> None:
        self._config = config
        self._streams = streams
        self._clock = clock

    def answer(self, request: Request, verifier: Verifier) -> Response:
        """A StreamResponse, or raise HandshakeRefused (answered with its status and reason)."""
        if request.method != "GET":
            raise MethodNotAllowed("method not allowed: GET only")
        if not _accepts_event_stream(request):
            raise NotAcceptable(f"not acceptable: /events answers {MEDIA_TYPE}")
        channels, query_token = read_query(request.path)
        header_token = _bearer(request)
        if query_token is not None and header_token is not None:
            raise BadRequest("bad request: a token in the query and in Authorization")
        token = header_token if header_token is not None else query_token
        if not token:
            raise Unauthorized("missing token")
        grant = grant_for_v2(verifier.verify(token, self._clock()), leeway=verifier.leeway)
        if not channels:
            raise BadRequest("bad request: no channels (name them with ?ch=)")
        if not grant.can_read:
            raise Forbidden(f"mode {grant.mode} cannot read")
        for channel in channels:
            if not grant.allows(channel):
                raise Forbidden(f"not allowed: {channel}")
        if len(channels) > self._config.max_channels:
            raise Forbidden(f"too many channels: at most {self._config.max_channels}")
        plan = Plan(grant, channels, *self._resume(request, len(channels)))
        headers = Headers(
            {
                "Content-Type": f"{MEDIA_TYPE}; charset=utf-8",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",  # nginx: pass events on as they come
                "Connection": "close",  # the body ends when the stream does
                **web.SECURITY_HEADERS,
            }
        )
        origin = request.headers.get("Origin")
        if origin is not None:  # it passed PGWS_ALLOWED_ORIGINS: let that page read the stream
            headers["Access-Control-Allow-Origin"] = origin
            headers["Vary"] = "Origin"
        return StreamResponse(
            HTTPStatus.OK.value,
            HTTPStatus.OK.phrase,
            headers,
            start=functools.partial(self._streams.start, plan=plan),
        )

    @staticmethod
    def _resume(request: Request, limit: int) -> tuple[tuple[str, ...] | None, bool]:
        values = request.headers.get_all("Last-Event-ID")
        if not values or not "".join(values).strip():
            return None, False
        if len(values) > 1:
            return (), True
        positions = read_stream_id(values[0].strip(), limit)
        return (positions, False) if positions is not None else ((), True)
