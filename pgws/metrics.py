"""`/metrics`: the gateway's counters in Prometheus text format, read when scraped.

Components keep plain integer counters; this collector turns them into metric families at scrape
time, so the message path never takes a metrics lock. Each gateway has its own registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from pgws.server import Gateway


class GatewayCollector(Collector):
    """Reads one gateway's counters on every scrape."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def collect(self) -> Iterator[Metric]:
        """Yield every pgws metric family."""
        gateway = self._gateway
        stats = gateway.socket_stats
        sockets = GaugeMetricFamily("pgws_sockets_open", "Open WebSockets", labels=["mode"])
        for mode in ("r", "w", "rw"):
            sockets.add_metric([mode], stats.open_by_mode.get(mode, 0))
        yield sockets
        yield GaugeMetricFamily(
            "pgws_channels",
            "Channels with at least one reader",
            value=gateway.registry.channel_count,
        )
        yield CounterMetricFamily(
            "pgws_frames_received", "Frames received from clients", value=stats.frames_in
        )
        yield CounterMetricFamily(
            "pgws_notifies_sent", "NOTIFYs sent to the database", value=gateway.notifier.sent
        )
        failed = CounterMetricFamily(
            "pgws_notifies_failed", "Client messages that could not be sent", labels=["reason"]
        )
        failed.add_metric(["too_big"], stats.too_big)
        failed.add_metric(["database"], gateway.notifier.failed)
        yield failed
        yield CounterMetricFamily(
            "pgws_notifies_resent",
            "NOTIFYs sent again on a fresh connection after theirs died",
            value=gateway.notifier.resent,
        )
        yield CounterMetricFamily(
            "pgws_notifications_received",
            "Notifications received on the LISTEN connection",
            value=gateway.listener.received,
        )
        yield CounterMetricFamily(
            "pgws_notifications_undecodable",
            "Notifications skipped because their payload was not UTF-8 (a SQL_ASCII database)",
            value=gateway.listener.undecodable,
        )
        yield CounterMetricFamily(
            "pgws_messages_delivered",
            "Messages handed to sockets (one per socket per notification)",
            value=gateway.registry.delivered,
        )
        rejected = CounterMetricFamily(
            "pgws_handshakes_rejected", "Refused WebSocket upgrades", labels=["reason"]
        )
        for reason, count in sorted(stats.rejected.items()):
            rejected.add_metric([reason], count)
        yield rejected
        yield GaugeMetricFamily(
            "pgws_listener_up",
            "1 while the LISTEN connection is up",
            value=1 if gateway.listener.up.is_set() else 0,
        )
        yield CounterMetricFamily(
            "pgws_listener_reconnects",
            "Times the LISTEN connection was replaced",
            value=gateway.listener.reconnects,
        )
        yield CounterMetricFamily(
            "pgws_slow_consumers_closed",
            "Sockets closed for not reading fast enough",
            value=stats.slow_consumers,
        )
        yield GaugeMetricFamily(
            "pgws_buffered_bytes",
            "Bytes all sockets hold unsent (bounded by PGWS_MAX_BUFFERED_TOTAL)",
            value=gateway.buffered_bytes(),
        )
        yield GaugeMetricFamily(
            "pgws_buffered_bytes_peak",
            "The most all sockets held unsent at once (counted with PGWS_MAX_BUFFERED_TOTAL set)",
            value=gateway.buffers.peak,
        )
        yield CounterMetricFamily(
            "pgws_buffered_total_drops",
            "Slow consumers closed because all sockets together held too much",
            value=stats.over_total,
        )
        yield CounterMetricFamily(
            "pgws_read_only_floods_closed",
            "Read-only sockets closed for sending more than they may",
            value=stats.read_only_floods,
        )
        usage = gateway.notifier.queue_usage
        if usage is not None:
            yield GaugeMetricFamily(
                "pgws_notification_queue_usage",
                "pg_notification_queue_usage(), sampled periodically",
                value=usage,
            )


def exposition(gateway: Gateway) -> Callable[[], tuple[bytes, str]]:
    """A function returning the current metrics text and its content type."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(gateway))

    def render() -> tuple[bytes, str]:
        return generate_latest(registry), CONTENT_TYPE_LATEST

    return render
