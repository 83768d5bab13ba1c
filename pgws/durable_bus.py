"""The durable bus (SPEC 7): durable channels through a table, the others through NOTIFY.

Chosen by the server when PGWS_DURABLE selects any channel. Sockets' writes to a durable channel
are stored (`db.durable_writer`: batched across sockets, wake-ups after the commit); writes to
other channels are NOTIFYs exactly as with `NotifyBus`, whose LISTEN connection keeps feeding
every reader (pg_notify producers keep working on durable channels too, without durability).
`db.durable_reader` follows the durable channels someone reads here and hands their new rows to
the registry, in order, once, with catch-up after any outage.

The resume API for protocol v2 and SSE is `DurableBus.subscribe_from` (its docstring holds the
caller's side of the contract).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Sequence

import structlog

from pgws.bus import Feed, NotifyBus
from pgws.config import Config
from pgws.db.durable import NotRecovered, Reason, Replay, StoredMessage
from pgws.db.durable_reader import DurableReader
from pgws.db.durable_schema import prepare_schema
from pgws.db.durable_writer import DurableWriter

__all__ = [
    "DurableBus",
    "DurableStats",
    "NotRecovered",
    "Reason",
    "Replay",
    "StoredMessage",
]

log = structlog.get_logger("pgws.durable")

# How long a new subscription waits for its channel's starting point before going on anyway.
FOLLOW_WAIT = 5.0
# Hands a channel's rows on: (channel, [(payload, position), ...]) -> how many deliveries.
DeliverStored = Callable[[str, Sequence[tuple[str, str]]], object]
# A live subscription on the channel lost continuity (v2 `gap`).
Gap = Callable[[str], object]


@dataclasses.dataclass(frozen=True, slots=True)
class DurableStats:
    """The durable counters at one moment, for /metrics."""

    stored: int  # socket messages committed
    failed: int  # socket messages refused or lost with their batch (writer got 1011 / 503)
    batches: int  # store transactions committed
    channels: int  # durable channels followed here
    delivered: int  # rows handed to the registry (once per row)
    caught_up: int  # rows found by the reconcile rather than a wake-up
    repairs: int  # reconciles that found rows no wake-up had announced
    replayed: int  # rows replayed to resuming subscribers
    recovered: int  # resumes answered with an exact replay
    not_recovered: int  # resumes answered "not recovered"
    oldest_undelivered: float  # seconds, at the last reconcile (0: nothing was behind)


class DurableBus:
    """A `bus.Bus`: durable channels stored and read back, the others by LISTEN/NOTIFY."""

    def __init__(
        self,
        config: Config,
        feed: Feed,
        deliver_stored: DeliverStored,
        gap: Gap,
        notify_bus: NotifyBus | None = None,
        lost: Callable[[], object] | None = None,
    ) -> None:
        self._config = config
        self._durable = config.durable
        # The listen channel's bus: given when `--workers` share one LISTEN per host (built with
        # `lost` then). `lost`: the LISTEN connection is back after an outage (non-durable `gap`).
        self.notify_bus = notify_bus if notify_bus is not None else NotifyBus(config, feed, lost)
        self.notifier, self.listener = self.notify_bus.notifier, self.notify_bus.listener
        self.writer = DurableWriter(config)
        self.reader = DurableReader(
            config,
            lambda channel, rows: deliver_stored(
                channel, [(row.payload, row.position) for row in rows]
            ),
            gap,
        )

    # --- bus.Bus ------------------------------------------------------------------------------

    async def start(self, stack: contextlib.AsyncExitStack) -> None:
        """Schema first (migrate or check: exit 78 when it is not right), then the connections."""
        done = await prepare_schema(
            self._config.db_uri, apply=self._config.durable_migrate, retries=self._config.retries
        )
        log.info("durable_schema_ready", result=done.describe(), channels=str(self._durable))
        await self.notify_bus.start(stack)
        stack.push_async_callback(self.reader.close)
        await self.reader.connect()
        stack.push_async_callback(self.writer.close)  # closed first: stores what sockets sent
        await self.writer.open()

    async def run(self) -> None:
        """Feed readers until cancelled: NOTIFYs, and durable rows (which survive outages)."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.reader.read_forever(), name="durable")
            await self.notify_bus.run()  # ListenerLost (no self-healing) ends the group

    async def publish(self, envelope: str, channel: str | None = None) -> str | None:
        """Store the envelope on a durable channel (its position), else NOTIFY it (None)."""
        if channel is not None and channel in self._durable:
            return await self.writer.store(channel, envelope)
        await self.notifier.notify(envelope)
        return None

    def is_up(self) -> bool:
        """Both LISTEN connections up: the listen channel's and the wake-ups'."""
        return self.notify_bus.is_up() and self.reader.wake_listener.up.is_set()

    # --- channels and resume ------------------------------------------------------------------

    def is_durable(self, channel: str) -> bool:
        """Whether PGWS_DURABLE selects `channel` (pure)."""
        return channel in self._durable

    def watch(self, channel: str, read: bool) -> None:
        """Registry.watch: follow a durable channel while someone here reads it."""
        if channel not in self._durable:
            return
        if read:
            self.reader.follow(channel)
        else:
            self.reader.unfollow(channel)

    def following(self, channel: str) -> bool:
        """Whether new rows of `channel` are being delivered here (its starting point is known)."""
        return self.reader.following(channel)

    async def until_following(self, channels: Iterable[str]) -> None:
        """Wait, briefly (FOLLOW_WAIT at most: the database may be away), until the durable ones
        of `channels` that someone here reads have their starting point read.

        Sessions call it after subscribing and before acting on the socket's frames, so a
        socket hears its own first message (SPEC 3) and a v2 `ok` to `sub` means "live"."""
        durable = [channel for channel in channels if channel in self._durable]
        if durable:
            await self.reader.until_following(durable, FOLLOW_WAIT)

    async def subscribe_from(
        self, channel: str, position: str, start: Callable[[Replay | NotRecovered], object]
    ) -> Replay | NotRecovered:
        """Resume a durable `channel` after `position`: exact replay then live, or not recovered.

        `start(result)` is called exactly once, synchronously, at the switch from replay to live,
        before this returns (and not at all if it raises). In it the caller, without awaiting:

        1. writes its reply (v2 `ok` with `recovered`, SSE `event: gap` for NotRecovered);
        2. writes `result.messages` in order when it is a Replay (StoredMessage: offset,
           position, payload = the raw text a legacy reader gets);
        3. subscribes its reader in the registry for `channel`.

        Live messages delivered after that all lie past `result.top`: no duplicate, no gap, in
        commit order. NotRecovered(reason, top): nothing replayed, live from now; `reason` is a
        Reason (malformed, unknown, other channel, older than retention, history reset, too far
        behind: more than PGWS_DURABLE_REPLAY_MAX). Any string is accepted as `position`.
        Raises DatabaseUnavailable when the database cannot answer (then reply 503, retry) and
        ValueError for a channel that is not durable (check is_durable first).
        """
        if channel not in self._durable:
            raise ValueError(f"{channel!r} is not a durable channel")
        return await self.reader.subscribe_from(
            channel, position, start, self._config.durable_replay_max
        )

    def stats(self) -> DurableStats:
        """A snapshot of the durable counters, for /metrics."""
        writer, reader = self.writer, self.reader.stats()
        return DurableStats(
            stored=writer.stored,
            failed=writer.failed,
            batches=writer.batches,
            channels=reader.channels,
            delivered=reader.delivered,
            caught_up=reader.caught_up,
            repairs=reader.repairs,
            replayed=reader.replayed,
            recovered=reader.recovered,
            not_recovered=reader.not_recovered,
            oldest_undelivered=reader.oldest_undelivered,
        )
