"""The seam between sockets and PostgreSQL: what sessions publish through, what feeds readers.

A bus takes envelopes from writing sockets (`publish`) and hands batches of notifications'
raw text to the registry (the `feed` it was built with), which fans them out to readers. Today's
bus is LISTEN/NOTIFY; the table-backed durable bus (SPEC 7, `pgws.durable_bus`) is another class
with the same methods, chosen by the server.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Protocol

from pgws.config import Config
from pgws.db.listener import Listener
from pgws.db.notifier import Notifier

# How often the notification queue's usage is sampled for /metrics.
QUEUE_SAMPLE_INTERVAL = 10.0

Feed = Callable[[list[str]], object]


class Bus(Protocol):
    """What the gateway needs from a bus."""

    async def start(self, stack: contextlib.AsyncExitStack) -> None:
        """Connect (with the start-up retries); register what closes it on `stack`."""

    async def run(self) -> None:
        """Feed readers until cancelled; raise when the link is lost for good."""

    async def publish(self, envelope: str, channel: str | None = None) -> str | None:
        """Send one envelope addressed to `channel`; raise NotifyFailed (with a reason for the
        client) if it was not. Returns the message's position when the channel is durable."""

    def is_up(self) -> bool:
        """Whether readers are being fed right now (/ready)."""


class NotifyBus:
    """LISTEN/NOTIFY: one LISTEN connection feeds readers, pipelined senders publish."""

    def __init__(self, config: Config, feed: Feed) -> None:
        self.notifier = Notifier(config)
        self.listener = Listener(config, feed)

    async def start(self, stack: contextlib.AsyncExitStack) -> None:
        # Closed in reverse: the senders finish what is queued, then the LISTEN connection goes.
        stack.push_async_callback(self.listener.close)
        await self.listener.connect()
        stack.push_async_callback(self.notifier.close)
        await self.notifier.open()

    async def run(self) -> None:
        # The sampler only informs /metrics; the listener's fate (ListenerLost) is the bus's.
        sampling = asyncio.create_task(
            self.notifier.sample_queue_usage_forever(QUEUE_SAMPLE_INTERVAL), name="queue-usage"
        )
        try:
            await self.listener.listen_forever()
        finally:
            sampling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampling

    async def publish(self, envelope: str, channel: str | None = None) -> str | None:
        await self.notifier.notify(envelope)
        return None

    def is_up(self) -> bool:
        return self.listener.up.is_set()
