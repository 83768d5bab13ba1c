"""What one socket may cost the others: nothing published past its token's `exp`, a bounded
stream from read-only sockets, and a process-wide bound on what slow readers hold in memory."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from typing import Any

import psycopg
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as sync_connect

from pgws.handler import READ_ONLY_BYTES, READ_ONLY_FRAMES
from tests.conftest import (
    TIMEOUT,
    Running,
    channel_name,
    make_token,
    recv_json,
    subscribed,
)

DB = psycopg.AsyncConnection[Any]


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
        assert gateway.gateway.handler.stats.frames_in == READ_ONLY_FRAMES + 1
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
    assert gateway.gateway.handler.stats.read_only_floods == 0
