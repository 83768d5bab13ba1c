"""In-process pub/sub: which subscriber reads which channel, and routing in both directions.

The registry does no I/O itself. Delivery to sockets and sending to the database are injected,
which keeps this module testable without a server and keeps the hot path (one notification to
many sockets) a dictionary lookup and one call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Iterable, Sequence, Sized
from typing import Any, Generic, TypeVar

from pgws.envelope import route_channel

S = TypeVar("S")

# Hands a batch of (readers, raw text) to sockets, in order; returns how many messages it handed.
Deliver = Callable[[Sequence[tuple[Iterable[S], str]]], int]
# Event streams (SPEC 9) get a `msg` event per notification; `pos` is the durable message's
# position (SPEC 7), None for a NOTIFY.
DeliverV2 = Callable[[Iterable[S], str, str, str | None], None]  # (readers, channel, raw, pos)
# pgws.v2 readers (SPEC 8): (readers, channel, raw, pos) -> the (readers, `msg` frame) entry the
# registry joins into the batch it hands to Deliver, so v2 sockets share frames and writes like
# legacy ones; None when the callable delivered by itself.
EntryV2 = Callable[[Iterable[S], str, str, str | None], tuple[Iterable[S], str] | None]
# Tells pgws.v2 readers of a channel that its continuity was lost (SPEC 8 `gap`).
DeliverGap = Callable[[Iterable[S], str], None]  # (readers, channel)
# (envelope, channel) -> the position when the channel is durable, else None.
SendOut = Callable[[str, str | None], Awaitable[str | None]]
# Called with a channel when it gets its first reader here (True) or loses its last (False).
Watch = Callable[[str, bool], None]


@dataclasses.dataclass(frozen=True, slots=True)
class RegistryStats:
    """The registry's figures at one moment (Registry.stats())."""

    channels: int  # channels with at least one reader
    delivered: int  # messages handed to sockets (one per socket per notification)


class Registry(Generic[S]):
    """Maps channels to their subscribers; routes notifications in and envelopes out."""

    def __init__(
        self,
        listen_channel: str,
        deliver: Deliver[S],
        send_out: SendOut,
        deliver_v2: EntryV2[S] | None = None,
        deliver_gap: DeliverGap[S] | None = None,
        deliver_events: DeliverV2[Any] | None = None,
        events_gap: DeliverGap[Any] | None = None,
    ) -> None:
        self._listen_channel = listen_channel
        self._deliver = deliver
        self._send_out = send_out
        self._deliver_v2 = deliver_v2
        self._deliver_gap = deliver_gap
        # Event streams (SPEC 9, pgws.sse): read-only readers of v2 `msg` events, not sockets.
        self._deliver_events = deliver_events
        self._events_gap = events_gap
        self._events: dict[str, set[Any]] = {}
        self._channels: dict[str, set[S]] = {}
        # pgws.v2 readers, apart: their subscriptions change at run time and they get other frames.
        self._v2: dict[str, set[S]] = {}
        self._published: dict[str, int] = {}  # per channel with readers: notifications so far
        self._watch: Watch | None = None
        self.delivered = 0  # messages handed to sockets; live, /metrics reads stats()

    def watch(self, watch: Watch) -> None:
        """Tell `watch` whenever a channel gets its first reader or loses its last (either
        protocol): the durable reader follows exactly the channels someone reads here."""
        self._watch = watch

    def _is_read(self, channel: str) -> bool:
        return channel in self._channels or channel in self._v2 or channel in self._events

    def subscribe(self, subscriber: S, channels: Iterable[str]) -> None:
        """Start delivering notifications on `channels` to `subscriber`."""
        for channel in channels:
            if self._watch is not None and not self._is_read(channel):
                self._watch(channel, True)
            self._channels.setdefault(channel, set()).add(subscriber)

    def unsubscribe(self, subscriber: S, channels: Iterable[str]) -> None:
        """Stop delivering to `subscriber`; channels nobody reads are forgotten."""
        for channel in channels:
            subscribers = self._channels.get(channel)
            if subscribers is not None:
                subscribers.discard(subscriber)
                if not subscribers:
                    del self._channels[channel]
                    self._published.pop(channel, None)
                    if self._watch is not None and not self._is_read(channel):
                        self._watch(channel, False)

    def subscribe_v2(self, subscriber: S, channel: str) -> None:
        """Start delivering `msg` frames on `channel` to a pgws.v2 `subscriber`."""
        if self._watch is not None and not self._is_read(channel):
            self._watch(channel, True)
        self._v2.setdefault(channel, set()).add(subscriber)

    def unsubscribe_v2(self, subscriber: S, channels: Iterable[str]) -> None:
        """Stop delivering `msg` frames on `channels` to a pgws.v2 `subscriber`."""
        for channel in channels:
            readers = self._v2.get(channel)
            if readers is not None:
                readers.discard(subscriber)
                if not readers:
                    del self._v2[channel]
                    if self._watch is not None and not self._is_read(channel):
                        self._watch(channel, False)

    def subscribe_events(self, stream: Any, channels: Iterable[str]) -> None:
        """Start delivering `msg` events on `channels` to an event stream."""
        for channel in channels:
            if self._watch is not None and not self._is_read(channel):
                self._watch(channel, True)
            self._events.setdefault(channel, set()).add(stream)

    def unsubscribe_events(self, stream: Any, channels: Iterable[str]) -> None:
        """Stop delivering to an event stream; channels nobody streams are forgotten."""
        for channel in channels:
            streams = self._events.get(channel)
            if streams is not None:
                streams.discard(stream)
                if not streams:
                    del self._events[channel]
                    if self._watch is not None and not self._is_read(channel):
                        self._watch(channel, False)

    def publish_in(self, raw: str) -> int:
        """Deliver one notification's raw text to the readers of its channel; return how many."""
        return self.publish_batch((raw,))

    def publish_batch(self, raws: Iterable[str]) -> int:
        """Deliver notifications, in order, to the readers of their channels; return how many.

        The channel is the JSON object's string `channel`; anything else goes to readers of a
        channel named like the listen channel (SPEC 3). The whole batch goes out in one call, so
        each socket gets all of its frames in one write.
        """
        batch: list[tuple[Iterable[S], str]] = []
        handed = 0
        v2 = self._v2 if self._deliver_v2 is not None else None
        events = self._events if self._deliver_events is not None else None
        for raw in raws:
            channel = route_channel(raw)
            if channel is None:
                channel = self._listen_channel
            if events:
                streams = events.get(channel)
                if streams and self._deliver_events is not None:
                    self._deliver_events(streams, channel, raw, None)
                    handed += len(streams)
            if v2:
                v2_readers = v2.get(channel)
                if v2_readers:
                    # A socket speaks one protocol, so each socket's order holds across both.
                    handed += self._v2_entry(batch, v2_readers, channel, raw, None)
            subscribers = self._channels.get(channel)
            if subscribers:
                self._published[channel] = self._published.get(channel, 0) + 1
                batch.append((subscribers, raw))
        if batch:
            handed += self._deliver(batch)
        self.delivered += handed
        return handed

    def continuity_lost(self, durable: Callable[[str], bool] | None = None) -> int:
        """The LISTEN connection is back after an outage: every pgws.v2 subscription and event
        stream of a non-durable channel may have missed messages, so each gets `gap` (SPEC 8,
        9); durable channels (`durable` says which) catch up instead. Return how many were told.
        """
        told = 0
        for readers_of, tell in ((self._v2, self._deliver_gap), (self._events, self._events_gap)):
            if tell is None:
                continue
            for channel, readers in list(readers_of.items()):
                if durable is None or not durable(channel):
                    tell(readers, channel)
                    told += len(readers)
        return told

    def channel_lost(self, channel: str) -> int:
        """One channel lost continuity here (a durable channel's rows pruned unread): its
        pgws.v2 readers and event streams get `gap`; return how many were told."""
        told = 0
        for readers_of, tell in ((self._v2, self._deliver_gap), (self._events, self._events_gap)):
            readers = readers_of.get(channel)
            if readers and tell is not None:
                tell(readers, channel)
                told += len(readers)
        return told

    def publish_stored(self, channel: str, messages: Sequence[tuple[str, str]]) -> int:
        """Deliver durable messages of `channel`, (payload, position) in order; return how many.

        Legacy readers get the payload's bytes exactly (SPEC 3, as a NOTIFY of that text);
        pgws.v2 readers a `msg` frame carrying the position (SPEC 7-8); event streams the
        same as an event whose id carries it (SPEC 9).
        """
        handed = 0
        streams = self._events.get(channel)
        if streams and self._deliver_events is not None:
            for payload, position in messages:
                self._deliver_events(streams, channel, payload, position)
                handed += len(streams)
        batch: list[tuple[Iterable[S], str]] = []
        v2_readers = self._v2.get(channel)
        if v2_readers:
            for payload, position in messages:
                handed += self._v2_entry(batch, v2_readers, channel, payload, position)
        subscribers = self._channels.get(channel)
        if subscribers:
            self._published[channel] = self._published.get(channel, 0) + len(messages)
            batch.extend((subscribers, payload) for payload, _ in messages)
        if batch:
            handed += self._deliver(batch)
        self.delivered += handed
        return handed

    def _v2_entry(
        self,
        batch: list[tuple[Iterable[S], str]],
        readers: Iterable[S],
        channel: str,
        raw: str,
        pos: str | None,
    ) -> int:
        """Add the `msg` entry of one notification for pgws.v2 `readers` to `batch`; return how
        many the entry builder handed by itself (those in `batch` are counted by Deliver)."""
        if self._deliver_v2 is None:
            return 0
        entry = self._deliver_v2(readers, channel, raw, pos)
        if entry is None:
            return len(readers) if isinstance(readers, Sized) else 0
        batch.append(entry)
        return 0

    def v2_readers(self, channel: str) -> frozenset[S]:
        """The current pgws.v2 readers of `channel` (a copy)."""
        return frozenset(self._v2.get(channel, ()))

    async def publish_out(self, envelope: str, channel: str | None = None) -> str | None:
        """Send an envelope (addressed to `channel`) to the database, which brings it back to
        every pgws reading it; the message's position when the channel is durable."""
        return await self._send_out(envelope, channel)

    def published(self, channels: Iterable[str]) -> int:
        """Notifications delivered on `channels` so far; a reader's count is the difference
        between its open and its close (one counter per channel, nothing per message per socket).
        """
        return sum(self._published.get(channel, 0) for channel in channels)

    def subscribers(self, channel: str) -> frozenset[S]:
        """The current readers of `channel` (a copy)."""
        return frozenset(self._channels.get(channel, ()))

    @property
    def channel_count(self) -> int:
        """How many channels have at least one reader."""
        if not (self._v2 or self._events):
            return len(self._channels)
        return len(self._channels.keys() | self._v2.keys() | self._events.keys())

    def stats(self) -> RegistryStats:
        """A snapshot of the figures, for /metrics."""
        return RegistryStats(channels=self.channel_count, delivered=self.delivered)
