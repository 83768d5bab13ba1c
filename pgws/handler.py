"""One WebSocket connection: the token check before the upgrade, then the message loop.

Reading sockets are registered with the registry and receive notifications through
`websockets.broadcast()`, so an idle reader costs no task beyond websockets' own. Writing sockets
turn each frame into one NOTIFY per granted channel.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from http import HTTPStatus
from typing import Any, cast

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
    BadRequest,
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
# What a client may send after its request and before the answer; more and it is cut off.
MAX_HELD_BYTES = 64 * 1024
# What a read-only socket may send per window before it is closed 1008 "read-only socket".
# SPEC 3 drops such frames unread; a browser's occasional keep-alive stays far below this, a
# flood (hundreds of MB/s, all read for nothing) goes within a window.
READ_ONLY_WINDOW = 10.0
READ_ONLY_FRAMES = 64
READ_ONLY_BYTES = 64 * 1024
# The ledger re-reads every holding socket's buffer at most this often when deciding to drop;
# in between it trusts its figures, which can only be high for sockets the kernel drained since.
LEDGER_REFRESH_SPACING = 0.005


@dataclasses.dataclass
class HandlerStats:
    """Counters the handler keeps for /metrics (plain integers: nothing on the hot path locks)."""

    open_by_mode: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    rejected: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    frames_in: int = 0
    too_big: int = 0
    slow_consumers: int = 0
    over_total: int = 0  # slow consumers closed for PGWS_MAX_BUFFERED_TOTAL
    read_only_floods: int = 0

    def snapshot(self) -> HandlerSnapshot:
        """A frozen copy of the counters, for /metrics."""
        return HandlerSnapshot(
            open_by_mode=dict(self.open_by_mode),
            rejected=dict(self.rejected),
            frames_in=self.frames_in,
            too_big=self.too_big,
            slow_consumers=self.slow_consumers,
            over_total=self.over_total,
            read_only_floods=self.read_only_floods,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class HandlerSnapshot:
    """HandlerStats at one moment (HandlerStats.snapshot())."""

    open_by_mode: Mapping[str, int]
    rejected: Mapping[str, int]
    frames_in: int
    too_big: int
    slow_consumers: int
    over_total: int
    read_only_floods: int


class BufferLedger:
    """What all sockets hold unsent, kept under PGWS_MAX_BUFFERED_TOTAL by dropping the largest.

    Each socket's figure is read from its transport after every write to it (one cheap call; a
    socket that keeps up holds nothing and costs nothing more). Buffers shrink unseen while the
    kernel takes data, so the sum can only be too high: before anyone is dropped, the sockets
    holding something (only those) are read again, and each candidate once more.
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.total = 0
        self.peak = 0  # the most the ledger counted at once, after any drops it made
        self._holding: set[Connection] = set()
        self._refreshed_at = -math.inf

    def update(self, conn: Connection, size: int) -> None:
        """A socket's transport now holds `size` unsent bytes."""
        self.total += size - conn.counted
        conn.counted = size
        if size:
            self._holding.add(conn)
        else:
            self._holding.discard(conn)
        if self.limit is not None and self.total > self.limit:
            self._shed(self.limit)
        if self.total > self.peak:
            self.peak = self.total

    def forget(self, conn: Connection) -> None:
        """The socket is gone, and its buffer with it."""
        self.total -= conn.counted
        conn.counted = 0
        self._holding.discard(conn)

    def refresh(self) -> int:
        """Read every holding socket's buffer again; return the exact total."""
        for conn in list(self._holding):
            self._set(conn, max(conn.buffered(), 0))
        self._refreshed_at = time.monotonic()
        return self.total

    def _set(self, conn: Connection, size: int) -> None:
        self.total += size - conn.counted
        conn.counted = size
        if not size:
            self._holding.discard(conn)

    def _shed(self, limit: int) -> None:
        """Drop the largest holders until the total is back under `limit`."""
        stale = time.monotonic() - self._refreshed_at >= LEDGER_REFRESH_SPACING
        if stale and self.refresh() <= limit:
            return
        for conn in sorted(self._holding, key=lambda held: held.counted, reverse=True):
            if self.total <= limit:
                return
            self._set(conn, max(conn.buffered(), 0))  # fresh, before it is judged
            if conn.counted and self.total > limit:
                conn.drop_over_total(self.total, limit)
                self.forget(conn)


class Connection(ServerConnection):
    """A server connection that carries its Grant and closes itself when it cannot keep up."""

    grant: Grant
    writer: EnvelopeWriter
    stats: HandlerStats
    opened_at: float
    frames_in: int = 0
    # Set once the buffer passed PGWS_CLIENT_MAX_BUFFER: deliver() writes nothing more to it, so
    # the limit holds within one message even when a burst is delivered before the drop can run.
    lagging: bool = False
    # Set once drop() failed the connection: RFC 6455 7.1.7, no further data is processed, so
    # frames websockets parsed before the drop (thousands from one read) are not published.
    dropped: bool = False
    # What a read-only socket sent in its current window (READ_ONLY_WINDOW).
    _window_start: float = -math.inf
    _window_frames: int = 0
    _window_bytes: int = 0
    # PGWS_MAX_BUFFERED_TOTAL: the ledger this socket reports to, and what it last counted here.
    ledger: BufferLedger | None = None
    counted: int = 0

    def send_data(self) -> None:
        """Write what websockets has queued, then tell the ledger what the transport holds."""
        super().send_data()
        ledger = self.ledger
        if ledger is not None:
            size = self.transport.get_write_buffer_size()
            if size != self.counted:
                ledger.update(self, size)

    def connection_lost(self, exc: Exception | None) -> None:
        """The transport is closed: its buffer no longer counts."""
        if self.ledger is not None:
            self.ledger.forget(self)
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        """The transport buffer passed PGWS_CLIENT_MAX_BUFFER: this reader is too slow."""
        super().pause_writing()
        self.lagging = True
        # Not from inside a broadcast: transport.write() is calling us.
        self.loop.call_soon(self.drop_slow_consumer)

    def drop_slow_consumer(self) -> None:
        """Close 1008 a reader that does not keep up (counted and logged once)."""
        if self.protocol.state is not State.OPEN:
            return
        self.stats.slow_consumers += 1
        log.warning("client_lagging", conn_id=str(self.id)[:8], buffered=self.buffered())
        self.drop(1008, "slow consumer")

    def drop_over_total(self, total: int, limit: int) -> None:
        """Close 1008 at once the largest holder when all sockets together hold too much.

        Aborted rather than given DROP_GRACE: its memory is the point, and a client this far
        behind would read the close frame only after everything queued before it.
        """
        self.lagging = True
        if self.protocol.state is State.OPEN:
            self.dropped = True
            self.stats.slow_consumers += 1
            self.stats.over_total += 1
            log.warning(
                "client_lagging",
                conn_id=str(self.id)[:8],
                buffered=self.counted,
                buffered_total=total,
                limit=limit,
            )
            self.protocol.fail(1008, "slow consumer")
        self.transport.abort()

    def read_only_budget_spent(self, frame: str | bytes) -> bool:
        """Count a frame from a read-only socket; True once the window's allowance is passed."""
        now = self.loop.time()
        if now - self._window_start >= READ_ONLY_WINDOW:
            self._window_start, self._window_frames, self._window_bytes = now, 0, 0
        self._window_frames += 1
        if isinstance(frame, str) and not frame.isascii():
            frame = frame.encode(errors="replace")  # bytes, as the client sent them
        self._window_bytes += len(frame)
        return self._window_frames > READ_ONLY_FRAMES or self._window_bytes > READ_ONLY_BYTES

    def drop(self, code: int, reason: str) -> None:
        """Close without waiting on the peer: queue the close frame, abort if it does not go."""
        if self.protocol.state is not State.OPEN:
            return
        self.dropped = True
        self.protocol.fail(code, reason)
        try:
            self.send_data()
        except OSError:
            self.transport.abort()
            return
        self.loop.call_later(DROP_GRACE, self.transport.abort)

    def buffered(self) -> int:
        """Unsent bytes in the transport (-1 when it cannot tell)."""
        try:
            return int(self.transport.get_write_buffer_size())
        except (AttributeError, RuntimeError):
            return -1


def tracked_connection_class(tracked: set[ServerConnection]) -> type[Connection]:
    """A Connection class whose instances sit in `tracked` from TCP accept to TCP close.

    websockets only lists connections once their handshake is done; shutdown must also be able
    to abort clients that connected and never sent a request.
    """

    class TrackedConnection(HeldUntilAnswered, Connection):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            tracked.add(self)

        def connection_lost(self, exc: Exception | None) -> None:
            tracked.discard(self)
            super().connection_lost(exc)

    return TrackedConnection


class HeldUntilAnswered(ServerConnection):
    """Holds back what a client sends after its request until the request is answered.

    websockets parses such bytes (a pipelined request, early frames) as frames while the
    handshake is pending, fails the connection, then trips its own assertion when it answers: no
    answer, and an ERROR logged. Held back, they are fed in after a 101 (early frames, in order)
    or dropped with the connection after any other answer (pgws answers one request per TCP
    connection).
    """

    _head_tail = b""  # the last bytes of the request head read so far, to find its end
    _held: bytearray | None = None

    def data_received(self, data: bytes) -> None:
        if self._held is None and (
            self.protocol.state is not State.CONNECTING or self.protocol.eof_sent
        ):
            super().data_received(data)
            return
        if self._held is None and self.request is None:
            seen = self._head_tail + data
            end = seen.find(b"\r\n\r\n")
            if end < 0:
                self._head_tail = seen[-3:]
                super().data_received(data)
                return
            cut = end + 4 - len(self._head_tail)
            super().data_received(data[:cut])
            data = data[cut:]
            if self.protocol.eof_sent:  # not a request websockets could parse: it gave up
                if data:
                    super().data_received(data)
                return
        self._hold(data)

    def _hold(self, data: bytes) -> None:
        if self._held is None:
            self._held = bytearray()
        self._held += data
        if len(self._held) > MAX_HELD_BYTES:
            self.transport.abort()  # no honest client sends this much before an answer

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super().handshake(*args, **kwargs)
        finally:
            held, self._held = self._held, None
            if held and self.protocol.state is State.OPEN:
                super().data_received(bytes(held))


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
        self.buffers = BufferLedger(config.max_buffered_total)

    def check_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """websockets' process_request: plain HTTP, a refused handshake, or None to upgrade."""
        try:
            if not wants_websocket(request):
                return self._plain(request)
            self._check_origin(request)
            self._check_capacity()
            grant = authorize(
                self.verifier,
                request.path,
                self._clock(),
                header_token=token_from_headers(request),
                max_channels=self._config.max_channels,
            )
            writer = _envelope_writer(grant)
        except HandshakeRefused as exc:
            self.stats.rejected[_reason_label(exc)] += 1
            log.info(
                "client_rejected", status=exc.status, reason=str(exc), remote=_remote(connection)
            )
            return web.text(HTTPStatus(exc.status), str(exc))
        conn = cast(Connection, connection)
        conn.grant, conn.writer = grant, writer
        conn.stats = self.stats
        if self.buffers.limit is not None:
            conn.ledger = self.buffers
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
        writer = conn.writer
        seen = 0
        expiry = None
        # Counted here and uncounted first thing in the `finally` below, nothing between that can
        # raise: PGWS_MAX_CONNECTIONS reads this count, and a leak would lock everyone out (503).
        stats.open_by_mode[grant.mode] += 1
        try:
            if grant.can_read:
                self._registry.subscribe(ws, grant.channels)
                seen = self._registry.published(grant.channels)
            if grant.expires_at is not None:
                delay = grant.expires_at - self._clock()
                expiry = conn.loop.call_later(max(delay, 0.0), conn.drop, 3001, "JWT expired")
            await self._announce(writer, "ConnectionOpen", grant)
            async for frame in ws:
                conn.frames_in += 1
                stats.frames_in += 1
                if conn.dropped:
                    break
                if not grant.can_write:
                    # SPEC 3: read-only sockets' frames are read and dropped, up to a budget.
                    if conn.read_only_budget_spent(frame):
                        self._close_flooding(conn)
                        break
                    continue
                if isinstance(frame, bytes):
                    try:
                        frame = frame.decode()
                    except UnicodeDecodeError:
                        await ws.close(1003, "binary frames must be UTF-8 text")
                        break
                if not await self._publish(conn, writer, frame):
                    break
            if conn.dropped:
                await ws.wait_closed()  # within DROP_GRACE: the close code is then known
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
            stats.open_by_mode[grant.mode] -= 1  # first: nothing below may skip it
            if expiry is not None:
                expiry.cancel()
            messages_out = 0
            if grant.can_read:
                messages_out = self._registry.published(grant.channels) - seen
                self._registry.unsubscribe(ws, grant.channels)
            log.info(
                "client_disconnected",
                code=ws.close_code,
                reason=ws.close_reason,
                frames_in=conn.frames_in,
                messages_out=messages_out,
                seconds=round(self._clock() - conn.opened_at, 3),
            )
        await self._announce(writer, "ConnectionClose", grant)

    def _close_flooding(self, conn: Connection) -> None:
        """A read-only socket sent more than it may: everything it sends is read for nothing."""
        self.stats.read_only_floods += 1
        log.info("client_flooding", frames_in=conn.frames_in, mode=conn.grant.mode)
        conn.drop(1008, "read-only socket")

    async def _publish(self, conn: Connection, writer: EnvelopeWriter, frame: str) -> bool:
        """NOTIFY one frame on every granted channel; False once the token has expired.

        Checked per frame and channel, not only by the expiry timer: a flood parsed in one read
        before the timer ran would otherwise be published after `exp` (SPEC 3: expiry).
        """
        expires_at = conn.grant.expires_at
        for channel in conn.grant.channels:
            now = self._clock()
            if expires_at is not None and now >= expires_at:
                conn.drop(3001, "JWT expired")
                return False
            envelope = writer.build("WebsocketMessage", channel, frame, now)
            await self._registry.publish_out(envelope)
        return True

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


def wants_websocket(request: Request) -> bool:
    """Whether the request asks to upgrade to WebSocket; raises BadRequest when ambiguous.

    Upgrade is a list (RFC 9110 7.8): `websocket, h2c` offers both and the server picks one, so
    it is an upgrade, not a static-file request. websockets' handshake accepts only a lone
    `websocket`, so the header is narrowed to the protocol picked. Two Upgrade lines are refused.
    """
    lines = request.headers.get_all("Upgrade")
    offered = [item.strip().lower() for line in lines for item in line.split(",") if item.strip()]
    if "websocket" not in offered:
        return False
    if len(lines) > 1:
        raise BadRequest("bad request: more than one Upgrade header")
    if offered != ["websocket"]:
        del request.headers["Upgrade"]
        request.headers["Upgrade"] = "websocket"
    return True


def _envelope_writer(grant: Grant) -> EnvelopeWriter:
    """The socket's envelope writer, built before the upgrade: claims it cannot carry are a 403."""
    try:
        return EnvelopeWriter(grant.claims)
    except (TypeError, ValueError, RecursionError):
        raise Forbidden("invalid claims: they cannot be serialised") from None


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
    for prefix in (
        "not allowed",
        "bad request",
        "too many channels",
        "invalid channel claim",
        "invalid claims",
    ):
        if text.startswith(prefix):
            return prefix.replace(" ", "_")
    return text.replace(" ", "_")


def _remote(ws: ServerConnection) -> str:
    try:
        address = ws.remote_address
    except (AttributeError, OSError):
        return "?"
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
