"""Server-sent events: `GET /events?ch=a&ch=b` streams channels' messages to readers (SPEC 9).

The request reaches pgws like any other (websockets' process_request); the handshake's origin
and capacity checks run first, then `EventsEndpoint` checks the rest the way a socket's token is
checked (the same verifier, the same grant rules, the same HTTP statuses) and answers with a
`StreamResponse`. In process_response the durable channels are resumed (DurableBus's
subscribe_from; a 503 if the database cannot say), then the stream leaves websockets: the
response head is written, the transport is handed to an `EventStream` (an asyncio protocol), and
the websockets connection is told its TCP connection is gone, so that it neither answers nor
aborts it and no task or open-timeout stays behind. An idle stream is then one small object.

Each message is one event whose `data:` is the v2 `msg` frame on one line, built once per
message for every stream reading the channel. The `id:` of a stream (`pgws`, then the last
position of each durable channel that has one, space separated) is sent at the start and with
every durable message, so a browser reconnecting sends it back as Last-Event-ID: the durable
channels are replayed exactly from there, and a resume that cannot be exact (a non-durable
channel, a position the server cannot resume from, an id pgws cannot read) is answered with
`event: gap` for those channels first. Streams count in PGWS_MAX_CONNECTIONS,
PGWS_MAX_BUFFERED_TOTAL and PGWS_CLIENT_MAX_BUFFER (closed when over it) like sockets; a comment
every KEEPALIVE_INTERVAL seconds keeps proxies from closing them; the token's `exp` ends them.

websockets internals used here (tests/test_sse.py fails if a release changes them):
`ServerConnection.transport` (replaced once the stream took the real one) and calling
`connection_lost()` to end websockets' side of a connection that is not a WebSocket.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from http import HTTPStatus
from typing import Any, Protocol, cast
from urllib.parse import parse_qsl

import structlog
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from pgws import web
from pgws.buffers import BufferLedger
from pgws.channels import channel_problem
from pgws.claims import Grant, Verifier, grant_for_v2
from pgws.config import Config
from pgws.connection import SocketStats, peer
from pgws.durable_bus import NotRecovered, Replay
from pgws.envelope import dump_json, inspect_notification
from pgws.errors import (
    BadRequest,
    DatabaseUnavailable,
    Forbidden,
    HandshakeRefused,
    Unauthorized,
)
from pgws.protocols import v2
from pgws.registry import Registry

log = structlog.get_logger("pgws.sse")

PATH = "/events"
MEDIA_TYPE = "text/event-stream"
# SPEC 9: a comment line every 25 s keeps proxies from closing an idle stream.
KEEPALIVE_INTERVAL = 25.0
# What a stream counts as in open_by_mode (PGWS_MAX_CONNECTIONS); /metrics shows it apart.
COUNTED_AS = "sse"
# The first word of every stream id; a Last-Event-ID without it is not one of ours.
ID_PREFIX = "pgws"
# A client sends nothing after its request; one that sends this much is cut off.
MAX_RECEIVED = 64 * 1024
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


class Resumer(Protocol):
    """What a stream needs of the durable bus (pgws.durable_bus.DurableBus)."""

    def is_durable(self, channel: str) -> bool:
        """Whether PGWS_DURABLE selects `channel`."""
        ...

    async def subscribe_from(
        self, channel: str, position: str, start: Callable[[Replay | NotRecovered], object]
    ) -> Replay | NotRecovered:
        """Replay `channel` after `position` and go live, calling `start` at the switch."""
        ...

    async def until_following(self, channels: Iterable[str]) -> None:
        """Wait (briefly) until the durable `channels` read here have their starting point."""
        ...


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


def msg_data(channel: str, raw: str, pos: str | None = None) -> bytes:
    """One message's `data:` line: the v2 `msg` frame (with `pos` when durable), on one line."""
    is_json, _ = inspect_notification(raw)
    frame = v2.msg(channel, raw, is_json, pos)
    if "\n" in frame or "\r" in frame:
        # Only JSON whitespace can hold a raw line break (strict JSON has none in strings).
        frame = frame.replace("\r", " ").replace("\n", " ")
    return b"data: " + frame.encode() + b"\n"


def msg_event(channel: str, raw: str) -> bytes:
    """A NOTIFY message as an event (SPEC 9): the same bytes for every stream."""
    return msg_data(channel, raw) + b"\n"


def channel_hash(channel: str) -> str:
    """The first part of `channel`'s positions (pgws.channel_hash() in SQL)."""
    return hashlib.md5(channel.encode(), usedforsecurity=False).hexdigest()[:8]


def gap_event(channel: str) -> bytes:
    """`event: gap` for a channel whose continuity was lost (SPEC 9)."""
    return b"event: gap\ndata: " + f'{{"ch":{dump_json(channel)}}}'.encode() + b"\n\n"


class _Detached:
    """What a websockets connection holds once its transport went to an EventStream."""

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass

    def is_closing(self) -> bool:
        return True

    def get_write_buffer_size(self) -> int:
        return 0


class EventStream(asyncio.Protocol):
    """One open event stream: the transport's protocol from the response head on."""

    def __init__(self, streams: EventStreams, plan: Plan, remote: str) -> None:
        self._streams = streams
        self.plan = plan
        self.remote = remote
        self.transport: asyncio.WriteTransport | None = None
        self.lagging = False  # over PGWS_CLIENT_MAX_BUFFER: nothing more is written
        self.counted = 0  # what the BufferLedger last counted for this stream
        self.opened_at = 0.0
        self._received = 0
        self._expiry: asyncio.TimerHandle | None = None
        # The last position of each durable channel, in the stream's channel order: its `id:`.
        self.positions: dict[str, str | None] = {}
        # While resuming: live events held until the replays and gaps are out (then None).
        self.held: list[bytes] | None = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.WriteTransport, transport)

    def data_received(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > MAX_RECEIVED and self.transport is not None:
            self.transport.abort()  # nothing is expected from the client after its request

    def eof_received(self) -> bool | None:
        return None  # the client is done: close (nothing else reads this connection)

    def pause_writing(self) -> None:
        """The transport passed PGWS_CLIENT_MAX_BUFFER: this reader is too slow."""
        if self.lagging:
            return
        self.lagging = True
        self._streams.stats.slow_consumers += 1
        log.warning("client_lagging", remote=self.remote, buffered=self.buffered(), sse=True)
        asyncio.get_running_loop().call_soon(self.abort)

    def resume_writing(self) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        self._streams.forget(self)

    def stored(self, data: bytes, channel: str, position: str) -> None:
        """A durable message: the stream's id moves on to `position` and goes with it."""
        if channel in self.positions:
            self.positions[channel] = position
        self.write(b"id: " + self.event_id().encode() + b"\n" + data + b"\n")

    def event_id(self) -> str:
        """The stream's `id:` now: the last position of each durable channel that has one."""
        return stream_id(p for p in self.positions.values() if p is not None)

    def release(self, first: Sequence[bytes]) -> None:
        """Resumed: write `first` (gaps, replays), then what was held, then go live."""
        held, self.held = self.held or [], None
        for data in (*first, *held):
            self.write(data)

    def write(self, data: bytes) -> None:
        """Queue `data` unless the stream lags or is closing; report the buffer to the ledger."""
        if self.held is not None:
            self.held.append(data)
            return
        transport = self.transport
        if self.lagging or transport is None or transport.is_closing():
            return
        transport.write(data)
        ledger = self._streams.ledger
        if ledger is not None:
            size = transport.get_write_buffer_size()
            if size != self.counted:
                ledger.update(self, size)

    def expire_at(self, when: float, clock: Callable[[], float]) -> None:
        """End the stream at `when` (UNIX seconds): the token's `exp` (SPEC 9)."""
        loop = asyncio.get_running_loop()
        self._expiry = loop.call_later(max(when - clock(), 0.0), self.end, "token expired")

    def end(self, why: str) -> None:
        """Say why in a comment, then close once what is queued has gone."""
        self.write(f": {why}\n\n".encode())
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # The BufferLedger's Holder protocol.

    def buffered(self) -> int:
        try:
            return -1 if self.transport is None else self.transport.get_write_buffer_size()
        except (AttributeError, RuntimeError):
            return -1

    def drop_over_total(self, total: int, limit: int) -> None:
        """All sockets and streams together hold more than PGWS_MAX_BUFFERED_TOTAL: go now."""
        self.lagging = True
        self._streams.stats.slow_consumers += 1
        self._streams.stats.over_total += 1
        log.warning("client_lagging", remote=self.remote, buffered=self.counted, sse=True)
        self.abort()


def deliver(streams: Iterable[EventStream], channel: str, raw: str, pos: str | None = None) -> None:
    """One message to every stream reading `channel`: its `data:` line encoded once; a durable
    one (`pos`) with each stream's own `id:`."""
    if pos is None:
        event = msg_event(channel, raw)
        for stream in streams:
            stream.write(event)
        return
    data = msg_data(channel, raw, pos)
    for stream in streams:
        stream.stored(data, channel, pos)


def deliver_gap(streams: Iterable[EventStream], channel: str) -> None:
    """`event: gap` for `channel` to every stream reading it (the LISTEN connection was lost)."""
    event = gap_event(channel)
    for stream in streams:
        stream.write(event)


class EventStreams:
    """Every open event stream of this process: start, keep-alive, shutdown."""

    def __init__(
        self,
        config: Config,
        registry: Registry[Any],
        stats: SocketStats,
        buffers: BufferLedger,
        clock: Callable[[], float] = time.time,
        durable: Callable[[], Resumer | None] = lambda: None,
    ) -> None:
        self._config = config
        self._durable = durable
        self._registry = registry
        self.stats = stats
        self.ledger = buffers if buffers.limit is not None else None
        self._clock = clock
        self.open: set[EventStream] = set()
        self._keepalive: asyncio.TimerHandle | None = None
        self._gone = asyncio.Event()

    async def start(
        self, connection: ServerConnection, response: Response, *, plan: Plan
    ) -> Response:
        """Resume the durable channels, then take the connection's transport from websockets
        and stream on it; a 503 instead when the database cannot say where to resume from."""
        stream = EventStream(self, plan, peer(connection))
        durable = self._durable()
        for channel in plan.channels:
            if durable is not None and durable.is_durable(channel):
                stream.positions[channel] = None
        try:
            first = await self._resume(stream, plan, durable)
        except DatabaseUnavailable:
            self._registry.unsubscribe_events(stream, plan.channels)
            log.info("events_resume_failed", remote=stream.remote)
            return web.text(HTTPStatus.SERVICE_UNAVAILABLE, "database unavailable\n")
        except BaseException:  # the open timeout, a bug: nothing may stay subscribed
            self._registry.unsubscribe_events(stream, plan.channels)
            raise
        transport = connection.transport
        if transport.is_closing():  # the client went away while its resume was read
            self._registry.unsubscribe_events(stream, plan.channels)
            return response
        stream.opened_at = self._clock()
        transport.write(response.serialize())
        transport.set_protocol(stream)
        stream.connection_made(transport)
        transport.set_write_buffer_limits(high=self._config.client_max_buffer)
        connection.transport = _Detached()  # type: ignore[assignment]
        connection.connection_lost(None)  # websockets' part is over: no answer, no task
        self.open.add(stream)
        self.stats.open_by_mode[COUNTED_AS] += 1
        log.info(
            "events_connected",
            remote=stream.remote,
            channels=list(plan.channels),
            resumed=plan.resume is not None,
        )
        stream.release(first)
        if plan.grant.expires_at is not None:
            stream.expire_at(plan.grant.expires_at, self._clock)
        if self._keepalive is None:
            self._schedule_keepalive()
        return response

    async def _resume(
        self, stream: EventStream, plan: Plan, durable: Resumer | None
    ) -> list[bytes]:
        """Subscribe the stream to its channels, resuming each durable one from the position
        Last-Event-ID names; return what goes first: `event: gap` for each channel that could
        not be resumed exactly, then the replays, then the stream's id (SPEC 9)."""
        gaps: list[bytes] = []
        replays: list[bytes] = []
        named = {p.split(":", 1)[0]: p for p in plan.resume or ()}
        if plan.unreadable:
            log.info("events_resume_unreadable")
        for channel in plan.channels:
            position = named.get(channel_hash(channel))
            if plan.resume is None or durable is None or channel not in stream.positions:
                if plan.resume is not None:
                    gaps.append(gap_event(channel))  # non-durable: nothing kept to resume from
                self._registry.subscribe_events(stream, [channel])
                continue
            if position is None:
                gaps.append(gap_event(channel))  # the id names no position of this channel
                self._registry.subscribe_events(stream, [channel])
                continue

            def start(
                result: Replay | NotRecovered, channel: str = channel, position: str = position
            ) -> None:
                if isinstance(result, Replay):
                    stream.positions[channel] = position  # up to date unless messages follow
                    for message in result.messages:
                        data = msg_data(channel, message.payload, message.position)
                        stream.positions[channel] = message.position
                        replays.append(b"id: " + stream.event_id().encode() + b"\n" + data + b"\n")
                else:
                    gaps.append(gap_event(channel))
                self._registry.subscribe_events(stream, [channel])

            await durable.subscribe_from(channel, position, start)
        if durable is not None:
            # The head means "live": a durable message committed after it reaches the stream.
            await durable.until_following(plan.channels)
        return [*gaps, *replays, f"id: {stream.event_id()}\n\n".encode()]

    def forget(self, stream: EventStream) -> None:
        """A stream's connection is closed: it reads nothing more and counts no more."""
        if stream not in self.open:
            return
        self.open.discard(stream)
        self._registry.unsubscribe_events(stream, stream.plan.channels)
        self.stats.open_by_mode[COUNTED_AS] -= 1
        if self.ledger is not None:
            self.ledger.forget(stream)
        log.info(
            "events_disconnected",
            remote=stream.remote,
            seconds=round(self._clock() - stream.opened_at, 3),
        )
        if not self.open:
            self._gone.set()

    def buffered(self) -> int:
        """What every stream's transport holds unsent (for /metrics)."""
        return sum(max(stream.buffered(), 0) for stream in self.open)

    def _schedule_keepalive(self) -> None:
        loop = asyncio.get_running_loop()
        self._keepalive = loop.call_later(KEEPALIVE_INTERVAL, self._keep_alive)

    def _keep_alive(self) -> None:
        for stream in list(self.open):
            stream.write(b": keep-alive\n\n")
        self._keepalive = None
        if self.open:
            self._schedule_keepalive()

    def end_all(self) -> None:
        """Shutdown: end every stream once what is queued has gone (browsers reconnect)."""
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        for stream in list(self.open):
            stream.end("server going away")

    async def wait_closed(self) -> None:
        """Return once no stream is open (bound it with a timeout)."""
        if self.open:
            self._gone.clear()
            await self._gone.wait()

    def abort_all(self) -> None:
        """Shutdown took too long: drop the streams still open."""
        for stream in list(self.open):
            stream.abort()
