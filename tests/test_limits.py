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

from tests.conftest import (
    TIMEOUT,
    Running,
    channel_name,
    make_token,
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
