"""One WebSocket connection: the token check before the upgrade, then the message loop.

Reading sockets are registered with the registry and receive notifications through
`websockets.broadcast()`, so an idle reader costs no task beyond websockets' own. Writing sockets
turn each frame into one NOTIFY per granted channel.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from http import HTTPStatus
from typing import cast

import structlog
from websockets.asyncio.server import ServerConnection, broadcast
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.typing import Subprotocol

from pgws import web
from pgws.claims import Grant, Verifier, authorize, token_shaped
from pgws.config import Config
from pgws.envelope import EnvelopeWriter
from pgws.errors import (
    Forbidden,
    HandshakeRefused,
    MessageRefused,
    MessageTooBig,
    ServiceUnavailable,
)
from pgws.registry import Registry

log = structlog.get_logger("pgws.handler")

# How long a socket we close on our own (slow consumer, expired token) may take to go.
DROP_GRACE = 2.0


@dataclasses.dataclass
class HandlerStats:
    """Counters the handler keeps for /metrics (plain integers: nothing on the hot path locks)."""

    open_by_mode: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    rejected: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    frames_in: int = 0
    too_big: int = 0
    slow_consumers: int = 0


class Connection(ServerConnection):
    """A server connection that carries its Grant and closes itself when it cannot keep up."""

    grant: Grant
    stats: HandlerStats
    opened_at: float
    frames_in: int = 0
    # Set once the buffer passed PGWS_CLIENT_MAX_BUFFER: deliver() writes nothing more to it, so
    # the limit holds within one message even when a burst is delivered before the drop can run.
    lagging: bool = False

    def pause_writing(self) -> None:
        """The transport buffer passed PGWS_CLIENT_MAX_BUFFER: this reader is too slow."""
        super().pause_writing()
        self.lagging = True
        # Not from inside a broadcast: transport.write() is calling us.
        self.loop.call_soon(self.drop, 1008, "slow consumer")

    def drop(self, code: int, reason: str) -> None:
        """Close without waiting on the peer: queue the close frame, abort if it does not go."""
        if self.protocol.state is not State.OPEN:
            return
        if code == 1008:
            self.stats.slow_consumers += 1
            log.warning("client_lagging", conn_id=str(self.id)[:8], buffered=self._buffered())
        self.protocol.fail(code, reason)
        try:
            self.send_data()
        except OSError:
            self.transport.abort()
            return
        self.loop.call_later(DROP_GRACE, self.transport.abort)

    def _buffered(self) -> int:
        try:
            return int(self.transport.get_write_buffer_size())
        except (AttributeError, RuntimeError):
            return -1


def tracked_connection_class(tracked: set[ServerConnection]) -> type[Connection]:
    """A Connection class whose instances sit in `tracked` from TCP accept to TCP close.

    websockets only lists connections once their handshake is done; shutdown must also be able
    to abort clients that connected and never sent a request.
    """

    class TrackedConnection(Connection):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            tracked.add(self)

        def connection_lost(self, exc: Exception | None) -> None:
            tracked.discard(self)
            super().connection_lost(exc)

    return TrackedConnection


def deliver(connections: Iterable[ServerConnection], message: str) -> None:
    """Send one notification to many sockets: encoded once, written without waiting.

    Readers already over their buffer limit are skipped; they are being dropped (1008).
    """
    broadcast((c for c in connections if not getattr(c, "lagging", False)), message)


class Handler:
    """Authorizes upgrades, answers plain HTTP, and runs each accepted connection."""

    def __init__(
        self,
        config: Config,
        verifier: Verifier,
        registry: Registry[ServerConnection],
        *,
        ready: Callable[[], bool] = lambda: True,
        metrics: Callable[[], tuple[bytes, str]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self.verifier = verifier  # replaced on SIGHUP; sockets already open keep their grant
        self._registry = registry
        self._ready = ready
        self._metrics = metrics
        self._clock = clock
        self.stats = HandlerStats()

    def check_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """websockets' process_request: plain HTTP, a refused handshake, or None to upgrade."""
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return self._plain(request)
        try:
            self._check_origin(request)
            self._check_capacity()
            grant = authorize(
                self.verifier,
                request.path,
                self._clock(),
                header_token=token_from_headers(request),
                max_channels=self._config.max_channels,
            )
        except HandshakeRefused as exc:
            self.stats.rejected[_reason_label(exc)] += 1
            log.info(
                "client_rejected", status=exc.status, reason=str(exc), remote=_remote(connection)
            )
            return web.text(HTTPStatus(exc.status), str(exc))
        conn = cast(Connection, connection)
        conn.grant = grant
        conn.stats = self.stats
        return None

    def _check_origin(self, request: Request) -> None:
        """PGWS_ALLOWED_ORIGINS: browsers elsewhere are refused (clients sending none are not)."""
        allowed = self._config.allowed_origins
        if allowed is None:
            return
        origins = request.headers.get_all("Origin")
        if origins and any(origin.strip().lower().rstrip("/") not in allowed for origin in origins):
            raise Forbidden("origin not allowed")

    def _check_capacity(self) -> None:
        limit = self._config.max_connections
        if limit is not None and sum(self.stats.open_by_mode.values()) >= limit:
            raise ServiceUnavailable("too many connections")

    def _plain(self, request: Request) -> Response:
        """Requests that are not upgrades: health, readiness, metrics, then static files."""
        path = request.path.split("?", 1)[0]
        head = request.method == "HEAD"
        if path in ("/health", "/ready", "/metrics") and request.method not in ("GET", "HEAD"):
            return web.serve_plain(None, request)  # the 405 static files get
        if path == "/health":
            return web.text(HTTPStatus.OK, "ok\n", head=head)
        if path == "/ready":
            if self._ready():
                return web.text(HTTPStatus.OK, "ready\n", head=head)
            return web.text(HTTPStatus.SERVICE_UNAVAILABLE, "not ready\n", head=head)
        if path == "/metrics" and self._metrics is not None:
            body, content_type = self._metrics()
            return web.respond(HTTPStatus.OK, body, content_type, head=head)
        return web.serve_plain(self._config.root_path, request)

    async def handle(self, ws: ServerConnection) -> None:
        """Run one accepted socket until it closes."""
        conn = cast(Connection, ws)
        grant, stats = conn.grant, self.stats
        conn.opened_at = self._clock()
        structlog.contextvars.bind_contextvars(conn_id=str(ws.id)[:8])
        log.info(
            "client_connected", remote=_remote(ws), channels=list(grant.channels), mode=grant.mode
        )
        stats.open_by_mode[grant.mode] += 1
        writer = EnvelopeWriter(grant.claims)
        seen = 0
        if grant.can_read:
            self._registry.subscribe(ws, grant.channels)
            seen = self._registry.published(grant.channels)
        expiry = None
        if grant.expires_at is not None:
            delay = grant.expires_at - self._clock()
            expiry = conn.loop.call_later(max(delay, 0.0), conn.drop, 3001, "JWT expired")
        try:
            await self._announce(writer, "ConnectionOpen", grant)
            async for frame in ws:
                conn.frames_in += 1
                stats.frames_in += 1
                if not grant.can_write:
                    continue  # SPEC 3: read-only sockets' frames are read and dropped
                if isinstance(frame, bytes):
                    try:
                        frame = frame.decode()
                    except UnicodeDecodeError:
                        await ws.close(1003, "binary frames must be UTF-8 text")
                        break
                for channel in grant.channels:
                    envelope = writer.build("WebsocketMessage", channel, frame, self._clock())
                    await self._registry.publish_out(envelope)
        except MessageRefused as exc:
            if isinstance(exc, MessageTooBig):
                stats.too_big += 1
            log.info("envelope_rejected", reason=str(exc), code=exc.close_code)
            await ws.close(exc.close_code, str(exc))
        except ConnectionClosed:
            pass
        except Exception:  # the task boundary: a bug costs this socket, never the server
            log.exception("handler_crashed")
            await ws.close(1011, "internal error")
        finally:
            if expiry is not None:
                expiry.cancel()
            messages_out = 0
            if grant.can_read:
                messages_out = self._registry.published(grant.channels) - seen
                self._registry.unsubscribe(ws, grant.channels)
            stats.open_by_mode[grant.mode] -= 1
            log.info(
                "client_disconnected",
                code=ws.close_code,
                reason=ws.close_reason,
                frames_in=conn.frames_in,
                messages_out=messages_out,
                seconds=round(self._clock() - conn.opened_at, 3),
            )
        await self._announce(writer, "ConnectionClose", grant)

    async def _announce(self, writer: EnvelopeWriter, event: str, grant: Grant) -> None:
        """Tell readers of the meta channel that a socket opened or closed (SPEC 3)."""
        meta = self._config.meta_channel
        if meta is None:
            return
        envelope = writer.build(event, meta, ",".join(grant.channels), self._clock())
        try:
            await self._registry.publish_out(envelope)
        except MessageRefused as exc:
            log.warning("meta_event_failed", meta_event=event, error=str(exc))


def token_from_headers(request: Request) -> str | None:
    """A token sent outside the URL: `Authorization: Bearer <jwt>`, or a JWT-shaped value of
    Sec-WebSocket-Protocol (what browsers can send). URLs end up in proxy logs; headers less so.
    """
    for value in request.headers.get_all("Authorization"):
        scheme, _, credentials = value.strip().partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    for offered in _offered_subprotocols(request):
        if token_shaped(offered):
            return offered
    return None


def select_subprotocol(
    connection: ServerConnection, offered: Sequence[Subprotocol]
) -> Subprotocol | None:
    """websockets' select_subprotocol: answer a token-carrying offer, as browsers require.

    `new WebSocket(url, ["jwt", token])` gets "jwt" back; `new WebSocket(url, [token])` gets its
    own value back. Offers without a token negotiate nothing.
    """
    if not any(token_shaped(value) for value in offered):
        return None
    if "jwt" in offered:
        return Subprotocol("jwt")
    return next(value for value in offered if token_shaped(value))


def _offered_subprotocols(request: Request) -> list[str]:
    return [
        item.strip()
        for header in request.headers.get_all("Sec-WebSocket-Protocol")
        for item in header.split(",")
        if item.strip()
    ]


def _reason_label(exc: HandshakeRefused) -> str:
    """A bounded label for the rejection metric (reasons can hold channel names)."""
    text = str(exc)
    for prefix in ("not allowed", "bad request", "too many channels"):
        if text.startswith(prefix):
            return prefix.replace(" ", "_")
    return text.replace(" ", "_")


def _remote(ws: ServerConnection) -> str:
    try:
        address = ws.remote_address
    except (AttributeError, OSError):
        return "?"
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
