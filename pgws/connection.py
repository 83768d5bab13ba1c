"""The websockets server connection pgws uses: it carries its Grant and drops itself when late.

A reader whose transport buffer passes PGWS_CLIENT_MAX_BUFFER is closed 1008 "slow consumer";
all sockets together report to the process's BufferLedger (PGWS_MAX_BUFFERED_TOTAL). Readers get
notifications through `pgws.fanout` (shared frames, one write per batch), so an idle reader costs
no task.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

import structlog
from websockets.asyncio.server import ServerConnection, broadcast
from websockets.protocol import State

from pgws.buffers import BufferLedger
from pgws.claims import Grant
from pgws.envelope import EnvelopeWriter, inspect_notification
from pgws.protocols import v2

# Socket events keep the logger name they had before the split, which log filters may select on.
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


@dataclasses.dataclass
class SocketStats:
    """Counters the sockets keep for /metrics (plain integers: nothing on the hot path locks)."""

    open_by_mode: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    rejected: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    frames_in: int = 0
    too_big: int = 0
    slow_consumers: int = 0
    over_total: int = 0  # slow consumers closed for PGWS_MAX_BUFFERED_TOTAL
    read_only_floods: int = 0

    def snapshot(self) -> SocketSnapshot:
        """A frozen copy of the counters, for /metrics."""
        return SocketSnapshot(
            open_by_mode=dict(self.open_by_mode),
            rejected=dict(self.rejected),
            frames_in=self.frames_in,
            too_big=self.too_big,
            slow_consumers=self.slow_consumers,
            over_total=self.over_total,
            read_only_floods=self.read_only_floods,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class SocketSnapshot:
    """SocketStats at one moment (SocketStats.snapshot())."""

    open_by_mode: Mapping[str, int]
    rejected: Mapping[str, int]
    frames_in: int
    too_big: int
    slow_consumers: int
    over_total: int
    read_only_floods: int


class Connection(ServerConnection):
    """A server connection that carries its Grant and closes itself when it cannot keep up."""

    grant: Grant
    writer: EnvelopeWriter
    stats: SocketStats
    opened_at: float
    frames_in: int = 0
    # Set once the buffer passed PGWS_CLIENT_MAX_BUFFER: fan_out() writes nothing more to it, so
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
    # pgws.v2 (SPEC 8): selected at the handshake; the grant its handshake token gave, if any;
    # the name its envelopes carry, and the channels on which it does not hear itself.
    v2: bool = False
    v2_grant: Grant | None = None
    v2_sender: str = ""
    v2_no_echo: frozenset[str] = frozenset()
    # PGWS_TRUSTED_PROXIES: the client's address as a trusted proxy forwarded it (no port).
    forwarded_client: str | None = None

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

    def read_only_budget_spent(self, size: int) -> bool:
        """Count a read-only frame of `size` bytes; True once the window's allowance is passed."""
        now = self.loop.time()
        if now - self._window_start >= READ_ONLY_WINDOW:
            self._window_start, self._window_frames, self._window_bytes = now, 0, 0
        self._window_frames += 1
        self._window_bytes += size
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


def deliver_v2(
    connections: Iterable[ServerConnection], channel: str, raw: str, pos: str | None = None
) -> tuple[list[ServerConnection], str]:
    """The fan-out entry for one notification to pgws.v2 sockets: its `msg` frame, built once,
    and the readers that get it. The registry joins it into the batch `pgws.fanout` writes, so
    v2 sockets get shared frames, one write per batch and the 1008 drop exactly as legacy ones.

    Echo suppression leaves out the sender's own socket on channels it subscribed with
    `echo:false`; the frame itself is never rewritten (SPEC 8). `pos`: a durable message's
    position.
    """
    is_json, sender = inspect_notification(raw)
    frame = v2.msg(channel, raw, is_json, pos)
    if sender is None:
        return list(connections), frame
    return [c for c in connections if not _own_echo(c, sender, channel)], frame


def deliver_gap(connections: Iterable[ServerConnection], channel: str) -> None:
    """Tell pgws.v2 sockets that `channel` lost continuity (SPEC 8 `gap`): one shared frame."""
    broadcast((c for c in connections if not getattr(c, "lagging", False)), v2.gap(channel))


def _own_echo(conn: ServerConnection, sender: str, channel: str) -> bool:
    return getattr(conn, "v2_sender", None) == sender and channel in getattr(conn, "v2_no_echo", ())


def peer(ws: ServerConnection) -> str:
    """The client's address for logs: the one a trusted proxy forwarded (an address alone), else
    the peer's `address:port` ("?" when the socket cannot tell)."""
    forwarded = getattr(ws, "forwarded_client", None)
    if forwarded is not None:
        return str(forwarded)
    try:
        address = ws.remote_address
    except (AttributeError, OSError):
        return "?"
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
