"""What /metrics shows of a running gateway: every component's stats snapshot, assembled.

The components count; this reads their snapshots (and the transports' unsent bytes) at one
moment into the `metrics.Snapshot` that metrics.py renders.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from pgws import metrics

if TYPE_CHECKING:
    from pgws.server import Gateway


def buffered_bytes(gateway: Gateway) -> int:
    """What every socket's transport holds unsent right now (read at each scrape)."""
    total = gateway.events.buffered()
    for conn in gateway._connections:
        try:
            total += conn.transport.get_write_buffer_size()
        except (AttributeError, RuntimeError):
            continue  # not connected yet, or already gone
    return total


def snapshot(gateway: Gateway) -> metrics.Snapshot:
    """Every component's stats at one moment, in the shape /metrics renders."""
    handler, registry = gateway.socket_stats.snapshot(), gateway.registry.stats()
    notifier, listener = gateway.notifier.stats(), gateway.listener.stats()
    return metrics.Snapshot(
        sockets_open=handler.open_by_mode,
        channels=registry.channels,
        frames_received=handler.frames_in,
        notifies_sent=notifier.sent,
        notifies_too_big=handler.too_big,
        notifies_failed_database=notifier.failed,
        notifies_resent=notifier.resent,
        notifications_received=listener.received,
        notifications_undecodable=listener.undecodable,
        messages_delivered=registry.delivered,
        handshakes_rejected=handler.rejected,
        listener_up=gateway.bus.is_up(),  # a worker fed through its host's shared LISTEN too
        listener_reconnects=listener.reconnects,
        slow_consumers_closed=handler.slow_consumers,
        buffered_bytes=buffered_bytes(gateway),
        buffered_bytes_peak=gateway.buffers.peak,
        buffered_total_drops=handler.over_total,
        read_only_floods_closed=handler.read_only_floods,
        notification_queue_usage=notifier.queue_usage,
        event_streams_open=len(gateway.events.open),
        durable=None if gateway.durable is None else dataclasses.asdict(gateway.durable.stats()),
    )
