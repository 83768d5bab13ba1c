"""Fan-out with shared frames: each notification encoded once, one write per socket per batch.

Server-to-client frames are unmasked, so a text frame's bytes are the same for every socket that
negotiated no extension. A batch (what one read of the LISTEN socket brought) is therefore
encoded once per notification and joined per socket: N notifications to M sockets cost M writes,
not N x M (websockets.broadcast() serialises and writes every message for every socket).

The only websockets internals used are in `_takes_raw_frames` and `_write`; tests/test_fanout.py
fails if a websockets release changes them (pyproject pins the range those tests pass on).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import Any

from websockets.asyncio.server import ServerConnection, broadcast
from websockets.protocol import State

_FIN_TEXT = 0x81


def text_frame(data: bytes) -> bytes:
    """An unmasked, final text frame carrying `data` (RFC 6455 section 5.2)."""
    length = len(data)
    if length < 126:
        return bytes((_FIN_TEXT, length)) + data
    if length < 1 << 16:
        return struct.pack("!BBH", _FIN_TEXT, 126, length) + data
    return struct.pack("!BBQ", _FIN_TEXT, 127, length) + data


def _takes_raw_frames(conn: ServerConnection) -> bool:
    """Whether pre-encoded frames may go to `conn` as they are: open, no extension (compression
    rewrites every frame), no fragmented message half sent."""
    protocol = conn.protocol
    return (
        protocol.state is State.OPEN
        and not protocol.extensions
        and not protocol.expect_continuation_frame
        and conn.send_in_progress is None
    )


def _write(conn: ServerConnection, data: bytes) -> None:
    """Queue whole frames behind whatever websockets has queued, then flush as it would."""
    conn.protocol.writes.append(data)
    conn.send_data()  # pgws's Connection overrides this to track buffers and limits


def _buffered(conn: ServerConnection) -> int:
    return int(conn.transport.get_write_buffer_size())


def _lagging(conn: Any) -> bool:
    return bool(getattr(conn, "lagging", False))


def fan_out(
    batch: Sequence[tuple[Iterable[ServerConnection], str]], buffer_limit: int | None = None
) -> int:
    """Deliver each (readers, text) of `batch` in order; return how many messages were handed.

    Readers past their buffer limit (`lagging`, being dropped with 1008) get nothing more. A
    socket whose joined frames would take it past `buffer_limit` gets them one by one until it
    lags, so the limit still holds within one message.
    """
    joined: dict[ServerConnection, list[bytes]] = {}
    handed = 0
    for readers, text in batch:
        frame: bytes | None = None
        for conn in readers:
            if _lagging(conn):
                continue
            if not _takes_raw_frames(conn):
                broadcast((conn,), text)  # compression or an odd state: websockets' own way
                handed += 1
                continue
            if frame is None:
                frame = text_frame(text.encode())
            parts = joined.get(conn)
            if parts is None:
                joined[conn] = [frame]
            else:
                parts.append(frame)
    for conn, frames in joined.items():
        if len(frames) == 1:
            _write(conn, frames[0])
            handed += 1
            continue
        data = b"".join(frames)
        if buffer_limit is None or _buffered(conn) + len(data) <= buffer_limit:
            _write(conn, data)
            handed += len(frames)
            continue
        for one in frames:  # near its limit: stop at the frame that crosses it
            if _lagging(conn) or not _takes_raw_frames(conn):
                break
            _write(conn, one)
            handed += 1
    return handed
