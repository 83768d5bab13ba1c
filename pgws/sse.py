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
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any, Protocol

import structlog
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Response

from pgws import web
from pgws.buffers import BufferLedger
from pgws.config import Config
from pgws.connection import SocketStats, peer
from pgws.durable_bus import NotRecovered, Replay
from pgws.errors import (
    DatabaseUnavailable,
)
from pgws.registry import Registry
from pgws.sse_request import Plan
from pgws.sse_stream import Detached, EventStream, channel_hash, gap_event, msg_data

log = structlog.get_logger("pgws.sse")

# SPEC 9: a comment line every 25 s keeps proxies from closing an idle stream.
KEEPALIVE_INTERVAL = 25.0
# What a stream counts as in open_by_mode (PGWS_MAX_CONNECTIONS); /metrics shows it apart.
COUNTED_AS = "sse"


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
        connection.transport = Detached()  # type: ignore[assignment]
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
