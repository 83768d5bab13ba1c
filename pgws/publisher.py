"""Who is publishing right now, for a bus that keeps each publisher's messages in order.

A socket's session sets PUBLISHER to itself in its own task's context; the NOTIFYs it has in
flight at once (tasks it starts inherit the context) then all go down one sender connection, in
the order it sent them.
"""

from __future__ import annotations

from contextvars import ContextVar

PUBLISHER: ContextVar[object | None] = ContextVar("pgws_publisher", default=None)
