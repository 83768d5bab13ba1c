"""What one socket may cost the others: nothing published past its token's `exp`, a bounded
stream from read-only sockets, and a process-wide bound on what slow readers hold in memory."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time
from typing import Any

import psycopg
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as sync_connect

from pgws.config import DEFAULT_MAX_BUFFERED_TOTAL, Config
from pgws.connection import READ_ONLY_BYTES, READ_ONLY_FRAMES
from pgws.errors import ConfigError
from tests.conftest import (
    TIMEOUT,
    Running,
    StartGateway,
    channel_name,
    drain_until_closed,
    http_get,
    make_token,
    recv_json,
    subscribed,
    until,
)

DB = psycopg.AsyncConnection[Any]
PAYLOAD_BYTES = 7000
FRAME_BYTES = PAYLOAD_BYTES + 200  # the notification's JSON around the payload, the frame header


class FloodingWriter(threading.Thread):
    """A client in its own thread that sends frames as fast as its socket takes them, each
    carrying its own send time, until the server closes it."""

    def __init__(self, url: str) -> None:
        super().__init__(name="flooding-writer", daemon=True)
        self.url = url
        self.sent = 0
        self.close: tuple[int, str] | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with sync_connect(self.url, open_timeout=TIMEOUT, close_timeout=TIMEOUT) as ws:
                deadline = time.monotonic() + TIMEOUT
                while time.monotonic() < deadline:
                    ws.send(json.dumps({"n": self.sent, "t": time.time()}))
                    self.sent += 1
        except ConnectionClosed as exc:
            if exc.rcvd is not None:
                self.close = (exc.rcvd.code, exc.rcvd.reason)
        except Exception as exc:  # noqa: BLE001  # a thread's failure must reach the test
            self.error = exc


def arrival(payload: str) -> dict[str, Any]:
    """A published frame: the writer's sequence and send time, and the server's publish time."""
    envelope = json.loads(payload)
    frame: dict[str, Any] = json.loads(envelope["payload"])
    frame["published"] = envelope["claims"]["message_delivered_at"]
    return frame


async def test_nothing_a_writer_sends_after_exp_is_published_and_it_gets_3001(
    gateway: Running, db: DB
) -> None:
    """Before: the frames websockets had parsed before the expiry timer ran were published for
    up to 2 s after `exp` (issue 8, item 16)."""
    chat = channel_name()
    exp = math.ceil(time.time()) + 2
    token = make_token({"mode": "w", "exp": exp})
    await db.execute(f'LISTEN "{gateway.config.listen_channel}"')
    writer = FloodingWriter(f"{gateway.url}/{chat}/{token}")
    writer.start()
    arrivals: list[dict[str, Any]] = []
    async with asyncio.timeout(TIMEOUT):
        while writer.is_alive():
            arrivals.extend([arrival(n.payload) async for n in db.notifies(timeout=0.1)])
    # Whatever was still on its way when the writer saw its close.
    arrivals.extend([arrival(n.payload) async for n in db.notifies(timeout=0.5)])
    assert writer.error is None, writer.error
    assert arrivals, "nothing was published before exp"
    sent_late = [frame for frame in arrivals if frame["t"] > exp]
    assert not sent_late, f"{len(sent_late)} frames sent after exp were published"
    published_late = [frame for frame in arrivals if frame["published"] >= exp]
    assert not published_late, (
        f"{len(published_late)} of {len(arrivals)} frames were published after exp, the last"
        f" {published_late[-1]['published'] - exp:.3f} s after"
    )
    assert writer.close == (3001, "JWT expired"), (writer.close, writer.sent, len(arrivals))


async def test_a_read_only_socket_flooding_frames_is_closed_1008_and_others_carry_on(
    gateway: Running, db: DB
) -> None:
    """Before: a read-only socket could send frames forever, each read and thrown away; it was
    never closed (issue 8, item 17)."""
    chat = channel_name()
    token = make_token({"mode": "r"})
    async with (
        gateway.connect(f"/{chat}/{token}") as flooder,
        gateway.connect(f"/{chat}/{token}") as neighbour,
    ):
        await subscribed(gateway, chat, 2)
        sent = 0
        started = time.monotonic()
        try:
            async with asyncio.timeout(TIMEOUT):
                while True:
                    await flooder.send("x" * 1000)
                    sent += 1
                    if sent % 50 == 0:
                        await asyncio.sleep(0)  # the server shares this loop
        except ConnectionClosed as exc:
            closed = exc
        elapsed = time.monotonic() - started
        assert closed.rcvd is not None
        assert (closed.rcvd.code, closed.rcvd.reason) == (1008, "read-only socket")
        assert elapsed < TIMEOUT / 2, elapsed
        # Closed at the first frame past the allowance.
        assert gateway.gateway.socket_stats.frames_in == READ_ONLY_FRAMES + 1
        await gateway.notify(db, {"channel": chat, "payload": "after the flood"})
        assert (await recv_json(neighbour))["payload"] == "after the flood"


async def test_a_read_only_socket_may_send_its_allowance_and_stays_open(
    gateway: Running, db: DB
) -> None:
    """SPEC 3 as before for a reasonable client: its frames are dropped, the socket stays open."""
    chat = channel_name()
    async with gateway.connect(f"/{chat}/{make_token({'mode': 'r'})}") as ws:
        await subscribed(gateway, chat)
        size = READ_ONLY_BYTES // READ_ONLY_FRAMES
        for index in range(READ_ONLY_FRAMES):
            await ws.send(f"{index:<{size}}")
        await gateway.notify(db, {"channel": chat, "payload": "still open"})
        assert (await recv_json(ws))["payload"] == "still open"
    assert gateway.gateway.socket_stats.read_only_floods == 0


def stalled_socket(gateway: Running) -> socket.socket:
    """A TCP connection to the gateway whose reader takes almost nothing (4 KiB window)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", gateway.gateway.port))
    return sock


def small_kernel_buffers(gateway: Running) -> None:
    """Keep the kernel from taking megabytes per socket (send buffers grow up to tcp_wmem's
    maximum), so what the stalled readers miss stays in pgws's own buffers, as on a busy host."""
    for conn in gateway.gateway._connections:
        conn.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
        )


def held(gateway: Running) -> int:
    """What the gateway's transports hold unsent, read from asyncio itself."""
    return sum(conn.transport.get_write_buffer_size() for conn in gateway.gateway._connections)


async def burst(gateway: Running, db: DB, channel: str, count: int) -> None:
    """`count` notifications of PAYLOAD_BYTES on `channel`, in one transaction."""
    await db.execute(
        "SELECT pg_notify(%s, json_build_object('channel', %s::text, 'payload',"
        " repeat('x', %s), 'n', n)::text) FROM generate_series(0, %s) AS n",
        (gateway.config.listen_channel, channel, PAYLOAD_BYTES, count - 1),
    )


async def test_past_the_total_bound_the_largest_buffers_are_dropped_first(
    start_gateway: StartGateway, db: DB
) -> None:
    """Before: only each socket's own buffer was bounded, so stalled readers together could
    hold any amount of memory (issue 8, item 11)."""
    limit = 1024 * 1024
    gateway: Running = await start_gateway(
        client_max_buffer=8 * 1024 * 1024, max_buffered_total=limit
    )
    shared, extra = channel_name(), channel_name()
    reader = make_token({"mode": "r"})
    listener = gateway.gateway.listener
    async with (
        gateway.connect(
            f"/{make_token({'mode': 'r', 'channels': [shared, extra]})}",
            max_queue=1,
            sock=stalled_socket(gateway),
        ) as biggest,
        gateway.connect(f"/{shared}/{reader}", max_queue=1, sock=stalled_socket(gateway)) as one,
        gateway.connect(f"/{shared}/{reader}", max_queue=1, sock=stalled_socket(gateway)) as two,
        gateway.connect(f"/{shared}/{reader}", max_queue=None) as fast,
    ):
        await subscribed(gateway, shared, 4)
        await subscribed(gateway, extra, 1)
        small_kernel_buffers(gateway)
        peak = 0

        async def sample_forever() -> None:
            nonlocal peak
            while True:  # what the transports really hold, not what the ledger thinks
                peak = max(peak, held(gateway))
                await asyncio.sleep(0)

        sampler = asyncio.create_task(sample_forever())
        try:
            # First the biggest reader alone falls ~800 KB behind: under the bound.
            await burst(gateway, db, extra, 120)
            await until(lambda: listener.received == 120, "the first burst")
            assert gateway.gateway.registry.subscribers(extra), "dropped under the bound"
            # Then everyone falls ~400 KB further behind: over the bound, until it goes.
            await burst(gateway, db, shared, 60)
            received = [json.loads(await fast.recv())["n"] for _ in range(60)]
            await until(lambda: listener.received == 180, "the second burst")
        finally:
            sampler.cancel()
        await until(lambda: not gateway.gateway.registry.subscribers(extra), "the drop")
        with pytest.raises(ConnectionClosed) as closed:
            await drain_until_closed(biggest)
        assert closed.value.rcvd is None  # aborted: its backlog was the point
        assert received == list(range(60))  # the fast reader: everything, in order
        # Only the biggest was dropped: the two smaller stalled readers are still there.
        assert len(gateway.gateway.registry.subscribers(shared)) == 3
        stats = gateway.gateway.socket_stats
        assert (stats.over_total, stats.slow_consumers) == (1, 1)
        assert peak <= limit + FRAME_BYTES, peak
        status, _, body = await http_get(gateway, "/metrics")
        assert status == 200
        assert b"pgws_buffered_total_drops_total 1.0" in body
        assert f"pgws_buffered_bytes {float(held(gateway))}".encode() in body
        for stalled in (one, two):
            stalled.transport.abort()  # they would never finish a closing handshake


REQUIRED = {"PGWS_DB_URI": "postgresql://localhost/db", "PGWS_JWT_SECRET": "s" * 32}


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, DEFAULT_MAX_BUFFERED_TOTAL), ("0", None), ("1024", 1024), (" 1073741824 ", 2**30)],
)
def test_max_buffered_total_is_bytes_and_zero_means_no_bound(
    value: str | None, expected: int | None
) -> None:
    """PGWS_MAX_BUFFERED_TOTAL: 256 MiB unless set; 0 turns the bound off."""
    env = REQUIRED if value is None else {**REQUIRED, "PGWS_MAX_BUFFERED_TOTAL": value}
    assert Config.from_env(env).max_buffered_total == expected


@given(st.text(max_size=20))
@example("\u00b2")  # a digit to str.isdigit(), not to int()
def test_max_buffered_total_parses_or_is_a_config_error_naming_it(value: str) -> None:
    """Any value is a bound in range, no bound, or a one-line error naming the variable."""
    error: ConfigError | None = None
    bound: int | None = None
    try:
        bound = Config.from_env({**REQUIRED, "PGWS_MAX_BUFFERED_TOTAL": value}).max_buffered_total
    except ConfigError as exc:
        error = exc
    if error is not None:
        assert error.name == "PGWS_MAX_BUFFERED_TOTAL"
        assert "\n" not in str(error)
    else:
        assert bound is None or 1024 <= bound <= 2**40
