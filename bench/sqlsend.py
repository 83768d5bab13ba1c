"""SQL producers without a gateway (issue 11 item 8): pgws.send, pgws.send_many, pg_notify.

A `bench.loadgen sqlsend` scenario: C pipelined connections each call one statement per
transaction in a closed loop (at most --window-per-connection calls in flight each), and the
commits acknowledged by PostgreSQL are counted. `--producer pg_notify` is the plain NOTIFY of
SPEC 3, `send` is `pgws.send(channel, payload)`, `send_many --batch N` is
`pgws.send_many(channel, payloads)` with N payloads. Every payload has the same size as the
notify scenario's envelope. Reported: messages committed per second (calls times batch).

    python -m bench.loadgen sqlsend --db-uri URI --producer send_many --batch 100
"""

from __future__ import annotations

import argparse
from typing import Any

import psycopg

from bench.pgraw import PipelinedNotifier
from pgws.db import durable_schema

STATEMENTS = {
    "pg_notify": b"SELECT pg_notify($1, $2)",
    "send": b"SELECT pgws.send($1, $2)",
    "send_many": b"SELECT pgws.send_many($1, $2)",
}
ENVELOPE_EXTRA = 110  # bytes an envelope adds around the payload (as in the notify scenario)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The scenario's own options."""
    parser.add_argument("--producer", choices=sorted(STATEMENTS), default="send")
    parser.add_argument("--batch", type=int, default=1, help="payloads per send_many")
    parser.add_argument("--connections", type=int, default=2)
    parser.add_argument(
        "--window-per-connection", type=int, default=0, help="calls in flight (0: 200 / batch)"
    )


def body(args: argparse.Namespace) -> bytes:
    """The second parameter: one payload, or a text[] literal of `batch` of them."""
    size: int = args.payload_size + ENVELOPE_EXTRA
    payload = b"x" * size  # nothing to quote in an array literal
    if args.producer != "send_many":
        return payload
    return b"{" + b",".join([payload] * args.batch) + b"}"


async def sqlsend(args: argparse.Namespace) -> dict[str, Any]:
    """Closed loop of SQL producer calls; messages committed per second."""
    # Imported here: loadgen imports this module, and bench.loadgen must not need it otherwise.
    from bench.loadgen import Tally, _closed_loop, probe_until

    if args.producer != "send_many":
        args.batch = 1
    if args.producer != "pg_notify":
        async with await psycopg.AsyncConnection.connect(args.db_uri, autocommit=True) as conn:
            await durable_schema.migrate(conn)
    senders = [
        await PipelinedNotifier.open(args.db_uri, STATEMENTS[args.producer])
        for _ in range(args.connections)
    ]
    acked = Tally()
    counts = [0] * len(senders)

    def counting(index: int) -> Any:
        def on_ack(count: int) -> None:
            counts[index] = count
            acked.set(sum(counts))

        return on_ack

    for index, sender in enumerate(senders):
        sender.on_ack = counting(index)
    channel, value = args.channel.encode(), body(args)
    await probe_until(lambda: senders[0].send(channel, value), acked, 1, "sqlsend")

    def send(seq: int) -> None:
        senders[seq % len(senders)].send(channel, value)

    per_connection = args.window_per_connection or max(2, 200 // args.batch)
    result = await _closed_loop(args, send, acked, per_connection * len(senders))
    errors = sum(sender.errors for sender in senders)
    message = next((sender.error_message for sender in senders if sender.errors), "")
    for sender in senders:
        await sender.close()
    if errors:
        raise RuntimeError(f"{errors} calls failed: {message}")
    return result | {
        "messages_per_s": result["seen_per_s"] * args.batch,
        "calls_per_s": result["seen_per_s"],
        "producer": args.producer,
        "batch": args.batch,
        "connections": len(senders),
    }
