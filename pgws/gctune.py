"""Garbage-collector settings for a server that holds thousands of sockets for a long time.

CPython collects its youngest generation every 700 new container objects. Opening a socket
allocates hundreds (the transport, websockets' connection, a task, futures, a grant, log
events), so collections ran every few handshakes, and each one also walks what the survivors
reference: a third of the CPU spent opening 5,000 sockets went to the collector (py-spy
--native, issue 10 item 5). What is alive once the server has started is frozen (never walked
again), and the thresholds are raised so that collections are rarer and each walks more at once.
Garbage that only the collector can free (reference cycles) waits a little longer: at most
THRESHOLDS[0] allocations for the youngest generation. 50,000 (with 20 and 100 above it) was
cheaper still per handshake, but 2,000 connect/close cycles then left RSS 4 MB higher
(tests/test_faults.py bounds that): 10,000 keeps most of the gain and passes.
"""

from __future__ import annotations

import gc

THRESHOLDS = (10_000, 10, 10)


def tune() -> None:
    """Freeze what start-up left alive and raise the collection thresholds (once, at start)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
