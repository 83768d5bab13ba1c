"""PGWS_MAX_BUFFERED_TOTAL: what all sockets of this process hold unsent, and who is dropped for it.

The ledger knows sockets only through `Holder` (what it reads and the one call it makes), so it
does not import the connection class that reports to it.
"""

from __future__ import annotations

import math
import time
from typing import Protocol

# The ledger re-reads every holding socket's buffer at most this often when deciding to drop;
# in between it trusts its figures, which can only be high for sockets the kernel drained since.
LEDGER_REFRESH_SPACING = 0.005


class Holder(Protocol):
    """A socket as the ledger sees it: what it last counted there, and how to read or drop it."""

    counted: int

    def buffered(self) -> int:
        """Unsent bytes in the transport (-1 when it cannot tell)."""
        ...

    def drop_over_total(self, total: int, limit: int) -> None:
        """Close this socket at once: all sockets together hold more than `limit`."""
        ...


class BufferLedger:
    """What all sockets hold unsent, kept under PGWS_MAX_BUFFERED_TOTAL by dropping the largest.

    Each socket's figure is read from its transport after every write to it (one cheap call; a
    socket that keeps up holds nothing and costs nothing more). Buffers shrink unseen while the
    kernel takes data, so the sum can only be too high: before anyone is dropped, the sockets
    holding something (only those) are read again, and each candidate once more.
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.total = 0
        self.peak = 0  # the most the ledger counted at once, after any drops it made
        self._holding: set[Holder] = set()
        self._refreshed_at = -math.inf

    def update(self, conn: Holder, size: int) -> None:
        """A socket's transport now holds `size` unsent bytes."""
        self.total += size - conn.counted
        conn.counted = size
        if size:
            self._holding.add(conn)
        else:
            self._holding.discard(conn)
        if self.limit is not None and self.total > self.limit:
            self._shed(self.limit)
        if self.total > self.peak:
            self.peak = self.total

    def forget(self, conn: Holder) -> None:
        """The socket is gone, and its buffer with it."""
        self.total -= conn.counted
        conn.counted = 0
        self._holding.discard(conn)

    def refresh(self) -> int:
        """Read every holding socket's buffer again; return the exact total."""
        for conn in list(self._holding):
            self._set(conn, max(conn.buffered(), 0))
        self._refreshed_at = time.monotonic()
        return self.total

    def _set(self, conn: Holder, size: int) -> None:
        self.total += size - conn.counted
        conn.counted = size
        if not size:
            self._holding.discard(conn)

    def _shed(self, limit: int) -> None:
        """Drop the largest holders until the total is back under `limit`."""
        stale = time.monotonic() - self._refreshed_at >= LEDGER_REFRESH_SPACING
        if stale and self.refresh() <= limit:
            return
        for conn in sorted(self._holding, key=lambda held: held.counted, reverse=True):
            if self.total <= limit:
                return
            self._set(conn, max(conn.buffered(), 0))  # fresh, before it is judged
            if conn.counted and self.total > limit:
                conn.drop_over_total(self.total, limit)
                self.forget(conn)
