"""One open event stream (SPEC 9): the asyncio protocol that owns its TCP connection, its
writes and limits, and the events written to it (`msg`, `gap`, the `id:` lines).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, cast

import structlog

from pgws.envelope import dump_json, inspect_notification
from pgws.protocols import v2
from pgws.sse_request import Plan, stream_id

if TYPE_CHECKING:
    from pgws.sse import EventStreams

log = structlog.get_logger("pgws.sse")  # its lines kept their logger when it left sse.py

# A client sends nothing after its request; one that sends this much is cut off.
MAX_RECEIVED = 64 * 1024


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


class Detached:
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
