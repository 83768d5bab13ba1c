"""The in-process registry: who reads which channel, and routing in both directions."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from pgws.registry import Registry

pytestmark = pytest.mark.nodb

LISTEN = "postgres-websockets-listener"


class Recorder:
    """Stands in for the sockets and the database: remembers every delivery and every send."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[frozenset[str], str]] = []
        self.sent: list[str] = []

    def deliver(self, batch: Sequence[tuple[Iterable[str], str]]) -> int:
        """Record each delivery of a batch (a snapshot of the subscribers, and the raw text)."""
        handed = 0
        for subscribers, message in batch:
            self.deliveries.append((frozenset(subscribers), message))
            handed += len(frozenset(subscribers))
        return handed

    async def send_out(self, envelope: str, channel: str | None = None) -> None:
        """Record one envelope sent to the database."""
        self.sent.append(envelope)


def make(listen: str = LISTEN) -> tuple[Registry[str], Recorder]:
    """A registry wired to a fresh Recorder."""
    recorder = Recorder()
    return Registry(listen, recorder.deliver, recorder.send_out), recorder


def on(channel: str, payload: str = "hi") -> str:
    """A notification addressed to `channel`, as a producer would send it."""
    return json.dumps({"event": "WebsocketMessage", "channel": channel, "payload": payload})


def test_publish_reaches_the_readers_of_its_channel_only() -> None:
    """A notification goes to the subscribers of its channel, raw text unchanged, and no others."""
    registry, recorder = make()
    registry.subscribe("s1", ["chat"])
    registry.subscribe("s2", ["chat"])
    registry.subscribe("s3", ["news"])
    raw = on("chat")
    assert registry.publish_in(raw) == 2
    assert recorder.deliveries == [(frozenset({"s1", "s2"}), raw)]


def test_multi_channel_subscriber_gets_each_channel() -> None:
    """A subscriber on several channels receives the notifications of each of them."""
    registry, recorder = make()
    registry.subscribe("s1", ["a", "b"])
    registry.subscribe("s2", ["b"])
    assert registry.publish_in(on("a")) == 1
    assert registry.publish_in(on("b")) == 2
    assert registry.publish_in(on("c")) == 0
    assert recorder.deliveries == [
        (frozenset({"s1"}), on("a")),
        (frozenset({"s1", "s2"}), on("b")),
    ]


def test_channel_without_readers_delivers_nothing() -> None:
    """A notification for a channel nobody reads returns 0 and does not call deliver."""
    registry, recorder = make()
    registry.subscribe("s1", ["a"])
    assert registry.publish_in(on("nobody")) == 0
    assert recorder.deliveries == []
    assert registry.delivered == 0


@pytest.mark.parametrize(
    "raw", ["plain text", "[1,2]", '{"channel":5}', '{"payload":"x"}', "", "null"]
)
def test_unrouted_notifications_go_to_listen_channel_readers(raw: str) -> None:
    """Notifications without a string `channel` go to readers of the listen channel's name."""
    registry, recorder = make()
    registry.subscribe("s1", [LISTEN])
    registry.subscribe("s2", ["chat"])
    assert registry.publish_in(raw) == 1
    assert recorder.deliveries == [(frozenset({"s1"}), raw)]


def test_unrouted_notifications_without_listen_readers_are_dropped() -> None:
    """With nobody reading the listen channel's name, unrouted notifications go nowhere."""
    registry, recorder = make()
    registry.subscribe("s1", ["chat"])
    assert registry.publish_in("plain text") == 0
    assert recorder.deliveries == []


def test_unsubscribe_stops_delivery() -> None:
    """After unsubscribing, a subscriber gets nothing more from that channel, still from others."""
    registry, recorder = make()
    registry.subscribe("s1", ["a", "b"])
    registry.subscribe("s2", ["a"])
    registry.unsubscribe("s1", ["a"])
    assert registry.subscribers("a") == {"s2"}
    assert registry.subscribers("b") == {"s1"}
    registry.publish_in(on("a"))
    assert recorder.deliveries == [(frozenset({"s2"}), on("a"))]


def test_last_unsubscribe_forgets_the_channel() -> None:
    """A channel whose last reader leaves is no longer counted."""
    registry, _ = make()
    registry.subscribe("s1", ["a", "b"])
    registry.subscribe("s2", ["a"])
    assert registry.channel_count == 2
    registry.unsubscribe("s1", ["a", "b"])
    assert registry.channel_count == 1
    registry.unsubscribe("s2", ["a"])
    assert registry.channel_count == 0
    assert registry.subscribers("a") == frozenset()


def test_unsubscribe_unknown_is_harmless() -> None:
    """Unsubscribing from a channel, or as a subscriber, never seen is a no-op."""
    registry, _ = make()
    registry.subscribe("s1", ["a"])
    registry.unsubscribe("s9", ["a", "zzz"])
    assert registry.subscribers("a") == {"s1"}
    assert registry.channel_count == 1


def test_subscribe_twice_is_idempotent() -> None:
    """Subscribing the same subscriber twice to a channel delivers once."""
    registry, recorder = make()
    registry.subscribe("s1", ["a", "a"])
    registry.subscribe("s1", ["a"])
    assert registry.publish_in(on("a")) == 1
    assert len(recorder.deliveries) == 1


def test_subscribers_is_a_copy() -> None:
    """The set `subscribers` returns does not change when the registry does."""
    registry, _ = make()
    registry.subscribe("s1", ["a"])
    snapshot = registry.subscribers("a")
    registry.subscribe("s2", ["a"])
    assert snapshot == {"s1"}


def test_delivered_counts_every_socket_reached() -> None:
    """`delivered` adds up how many subscribers each notification reached."""
    registry, _ = make()
    registry.subscribe("s1", ["a", "b"])
    registry.subscribe("s2", ["a"])
    registry.publish_in(on("a"))
    registry.publish_in(on("b"))
    registry.publish_in(on("c"))
    assert registry.delivered == 3


async def test_publish_out_sends_the_envelope() -> None:
    """publish_out awaits send_out with the envelope text, and delivers nothing locally."""
    registry, recorder = make()
    registry.subscribe("s1", ["chat"])
    envelope = on("chat", "from a client")
    await registry.publish_out(envelope)
    assert recorder.sent == [envelope]
    assert recorder.deliveries == []


SUBSCRIBERS = st.sampled_from(["s1", "s2", "s3", "s4"])
CHANNELS = st.lists(st.sampled_from(["a", "b", "c", LISTEN]), max_size=4)


class RegistryMachine(RuleBasedStateMachine):
    """Any sequence of subscribe/unsubscribe/publish agrees with a plain dict-of-sets model."""

    def __init__(self) -> None:
        super().__init__()
        self.registry, self.recorder = make()
        self.model: dict[str, set[str]] = {}
        self.delivered = 0

    @rule(subscriber=SUBSCRIBERS, channels=CHANNELS)
    def subscribe(self, subscriber: str, channels: list[str]) -> None:
        """Subscribe in both the registry and the model."""
        self.registry.subscribe(subscriber, channels)
        for channel in channels:
            self.model.setdefault(channel, set()).add(subscriber)

    @rule(subscriber=SUBSCRIBERS, channels=CHANNELS)
    def unsubscribe(self, subscriber: str, channels: list[str]) -> None:
        """Unsubscribe in both the registry and the model."""
        self.registry.unsubscribe(subscriber, channels)
        for channel in channels:
            self.model.get(channel, set()).discard(subscriber)

    @rule(channel=st.sampled_from(["a", "b", "c", "d"]))
    def publish(self, channel: str) -> None:
        """A notification reaches exactly the model's readers of its channel."""
        readers = self.model.get(channel, set())
        before = len(self.recorder.deliveries)
        assert self.registry.publish_in(on(channel)) == len(readers)
        if readers:
            assert self.recorder.deliveries[before:] == [(frozenset(readers), on(channel))]
        else:
            assert len(self.recorder.deliveries) == before
        self.delivered += len(readers)

    @invariant()
    def agrees_with_model(self) -> None:
        """Subscribers, channel count and delivered counter all match the model."""
        for channel in ("a", "b", "c", "d", LISTEN):
            assert self.registry.subscribers(channel) == self.model.get(channel, set())
        assert self.registry.channel_count == sum(1 for s in self.model.values() if s)
        assert self.registry.delivered == self.delivered


TestRegistryMachine = RegistryMachine.TestCase


def test_a_batch_is_delivered_in_one_call_in_order() -> None:
    """What one read of the LISTEN socket brought goes out together: one write per socket."""
    registry, recorder = make()
    registry.subscribe("s1", ["a", "b"])
    registry.subscribe("s2", ["b"])
    raws = [on("a", "1"), on("nobody"), on("b", "2"), on("a", "3")]
    assert registry.publish_batch(raws) == 4
    assert recorder.deliveries == [
        (frozenset({"s1"}), raws[0]),
        (frozenset({"s1", "s2"}), raws[2]),
        (frozenset({"s1"}), raws[3]),
    ]
    assert registry.published(["a"]) == 2


def test_watch_reports_a_channels_first_reader_and_its_last_across_both_protocols() -> None:
    """Registry.watch: told once when a channel gets its first reader (legacy or v2) and once
    when its last one goes (what the durable reader follows)."""
    registry, _ = make()
    seen: list[tuple[str, bool]] = []
    registry.watch(lambda channel, read: seen.append((channel, read)))
    registry.subscribe("s1", ["a"])
    registry.subscribe("s2", ["a"])
    registry.subscribe_v2("v", "a")
    registry.subscribe_v2("v", "b")
    registry.unsubscribe("s1", ["a"])
    registry.unsubscribe("s2", ["a"])
    assert seen == [("a", True), ("b", True)]
    registry.unsubscribe_v2("v", ["a", "b"])
    assert seen == [("a", True), ("b", True), ("a", False), ("b", False)]


def test_publish_stored_gives_legacy_readers_the_payload_and_v2_readers_the_position() -> None:
    """Durable rows go to their channel's readers whatever the payload names: legacy readers
    get the payload text, v2 readers (payload, position) through deliver_v2."""
    recorder = Recorder()
    v2_calls: list[tuple[frozenset[str], str, str, str | None]] = []
    registry: Registry[str] = Registry(
        LISTEN,
        recorder.deliver,
        recorder.send_out,
        lambda readers, channel, raw, pos: v2_calls.append((frozenset(readers), channel, raw, pos)),
    )
    registry.subscribe("legacy", ["chat"])
    registry.subscribe_v2("v2", "chat")
    rows = [(on("elsewhere", "1"), "p1"), ("plain text", "p2")]
    assert registry.publish_stored("chat", rows) == 4
    assert recorder.deliveries == [
        (frozenset({"legacy"}), rows[0][0]),
        (frozenset({"legacy"}), "plain text"),
    ]
    assert v2_calls == [
        (frozenset({"v2"}), "chat", rows[0][0], "p1"),
        (frozenset({"v2"}), "chat", "plain text", "p2"),
    ]
    assert registry.published(["chat"]) == 2
    assert registry.publish_stored("nobody", rows) == 0
