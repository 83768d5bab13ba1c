"""`/metrics`: a snapshot of the gateway's figures in Prometheus text format, read when scraped.

Components keep plain integer counters and hand out frozen snapshots of them (`stats()`); the
server turns those into one `Snapshot` per scrape, and this module only renders it, so the message
path never takes a metrics lock and nothing here knows the components. Each gateway has its own
registry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """Every figure /metrics shows, taken at one scrape (fields are named after the metrics)."""

    sockets_open: Mapping[str, int]  # by mode: r, w, rw
    channels: int
    frames_received: int
    notifies_sent: int
    notifies_too_big: int
    notifies_failed_database: int
    notifies_resent: int
    notifications_received: int
    notifications_undecodable: int
    messages_delivered: int
    handshakes_rejected: Mapping[str, int]  # by reason
    listener_up: bool
    listener_reconnects: int
    slow_consumers_closed: int
    buffered_bytes: int
    buffered_bytes_peak: int
    buffered_total_drops: int
    read_only_floods_closed: int
    notification_queue_usage: float | None  # None until sampled, and while the database is away
    # SPEC 7 durable counters by name (pgws.durable_bus.DurableStats); None in NOTIFY-only mode.
    durable: Mapping[str, float] | None = None


# name in DurableStats -> (metric, help, counter or gauge)
_DURABLE: tuple[tuple[str, str, str, bool], ...] = (
    ("stored", "pgws_durable_stored", "Socket messages stored on durable channels", True),
    (
        "failed",
        "pgws_durable_failed",
        "Socket messages on durable channels that were not stored (their writer was told)",
        True,
    ),
    ("batches", "pgws_durable_batches", "Transactions that stored sockets' messages", True),
    ("channels", "pgws_durable_channels", "Durable channels followed by this process", False),
    (
        "delivered",
        "pgws_durable_delivered",
        "Durable messages read and handed to the readers of their channel (once per message)",
        True,
    ),
    (
        "caught_up",
        "pgws_durable_caught_up",
        "Durable messages found by the periodic reconcile rather than a wake-up",
        True,
    ),
    (
        "repairs",
        "pgws_durable_reconcile_repairs",
        "Reconciles that found messages no wake-up had announced (lost wake-up or outage)",
        True,
    ),
    ("replayed", "pgws_durable_replayed", "Durable messages replayed to resuming clients", True),
)


class SnapshotCollector(Collector):
    """Takes one snapshot per scrape and yields its metric families."""

    def __init__(self, take: Callable[[], Snapshot]) -> None:
        self._take = take

    def collect(self) -> Iterator[Metric]:
        """Yield every pgws metric family."""
        stats = self._take()
        sockets = GaugeMetricFamily("pgws_sockets_open", "Open WebSockets", labels=["mode"])
        for mode in ("r", "w", "rw"):
            sockets.add_metric([mode], stats.sockets_open.get(mode, 0))
        yield sockets
        yield GaugeMetricFamily(
            "pgws_channels", "Channels with at least one reader", value=stats.channels
        )
        yield CounterMetricFamily(
            "pgws_frames_received", "Frames received from clients", value=stats.frames_received
        )
        yield CounterMetricFamily(
            "pgws_notifies_sent", "NOTIFYs sent to the database", value=stats.notifies_sent
        )
        failed = CounterMetricFamily(
            "pgws_notifies_failed", "Client messages that could not be sent", labels=["reason"]
        )
        failed.add_metric(["too_big"], stats.notifies_too_big)
        failed.add_metric(["database"], stats.notifies_failed_database)
        yield failed
        yield CounterMetricFamily(
            "pgws_notifies_resent",
            "NOTIFYs sent again on a fresh connection after theirs died",
            value=stats.notifies_resent,
        )
        yield CounterMetricFamily(
            "pgws_notifications_received",
            "Notifications received on the LISTEN connection",
            value=stats.notifications_received,
        )
        yield CounterMetricFamily(
            "pgws_notifications_undecodable",
            "Notifications skipped because their payload was not UTF-8 (a SQL_ASCII database)",
            value=stats.notifications_undecodable,
        )
        yield CounterMetricFamily(
            "pgws_messages_delivered",
            "Messages handed to sockets (one per socket per notification)",
            value=stats.messages_delivered,
        )
        rejected = CounterMetricFamily(
            "pgws_handshakes_rejected", "Refused WebSocket upgrades", labels=["reason"]
        )
        for reason, count in sorted(stats.handshakes_rejected.items()):
            rejected.add_metric([reason], count)
        yield rejected
        yield GaugeMetricFamily(
            "pgws_listener_up",
            "1 while the LISTEN connection is up",
            value=1 if stats.listener_up else 0,
        )
        yield CounterMetricFamily(
            "pgws_listener_reconnects",
            "Times the LISTEN connection was replaced",
            value=stats.listener_reconnects,
        )
        yield CounterMetricFamily(
            "pgws_slow_consumers_closed",
            "Sockets closed for not reading fast enough",
            value=stats.slow_consumers_closed,
        )
        yield GaugeMetricFamily(
            "pgws_buffered_bytes",
            "Bytes all sockets hold unsent (bounded by PGWS_MAX_BUFFERED_TOTAL)",
            value=stats.buffered_bytes,
        )
        yield GaugeMetricFamily(
            "pgws_buffered_bytes_peak",
            "The most all sockets held unsent at once (counted with PGWS_MAX_BUFFERED_TOTAL set)",
            value=stats.buffered_bytes_peak,
        )
        yield CounterMetricFamily(
            "pgws_buffered_total_drops",
            "Slow consumers closed because all sockets together held too much",
            value=stats.buffered_total_drops,
        )
        yield CounterMetricFamily(
            "pgws_read_only_floods_closed",
            "Read-only sockets closed for sending more than they may",
            value=stats.read_only_floods_closed,
        )
        if stats.durable is not None:
            yield from _durable_families(stats.durable)
        if stats.notification_queue_usage is not None:
            yield GaugeMetricFamily(
                "pgws_notification_queue_usage",
                "pg_notification_queue_usage(), sampled periodically",
                value=stats.notification_queue_usage,
            )


def _durable_families(figures: Mapping[str, float]) -> Iterator[Metric]:
    for key, name, text, counter in _DURABLE:
        family = CounterMetricFamily if counter else GaugeMetricFamily
        yield family(name, text, value=figures.get(key, 0))
    resumes = CounterMetricFamily(
        "pgws_durable_resumes", "Resumes from a position, by outcome", labels=["result"]
    )
    resumes.add_metric(["recovered"], figures.get("recovered", 0))
    resumes.add_metric(["not_recovered"], figures.get("not_recovered", 0))
    yield resumes
    yield GaugeMetricFamily(
        "pgws_durable_oldest_undelivered_seconds",
        "Age of the oldest durable message not yet delivered here, at the last reconcile",
        value=figures.get("oldest_undelivered", 0.0),
    )


def exposition(take: Callable[[], Snapshot]) -> Callable[[], tuple[bytes, str]]:
    """A function returning the metrics text for a fresh snapshot, and its content type."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(take))

    def render() -> tuple[bytes, str]:
        return generate_latest(registry), CONTENT_TYPE_LATEST

    return render
