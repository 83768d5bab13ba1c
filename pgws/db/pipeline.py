"""One connection in libpq pipeline mode that runs one prepared statement per message.

This is psycopg's documented `pq` layer driven by hand (see the note below); only the senders
(`pgws.db.notifier`) use it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import pq

from pgws.db.connect import describe, sever
from pgws.errors import NotifyFailed

# psycopg 3.3 has no public way to end every statement of a pipeline with its own Sync without
# waiting for the results there and then: `Pipeline.sync()` is a round trip, `_enqueue_sync()` is
# private, and `psycopg.generators` / `psycopg.waiting` are internals. So the senders drive libpq's
# pipeline mode through psycopg's documented `pq` layer (`PGconn.send_query_prepared`,
# `pipeline_sync`, `flush`, `consume_input`, `get_result`; stable since psycopg 3.1), which is
# also what bench/pgraw.py measures as the raw limit. psycopg only opens and closes them.
_STATEMENT = b"pgws_notify"
_SYNC = pq.ExecStatus.PIPELINE_SYNC
_ERRORS = (pq.ExecStatus.FATAL_ERROR, pq.ExecStatus.PIPELINE_ABORTED)
_BAD = pq.ConnStatus.BAD


class Message:
    """One NOTIFY on its way: the payload, its waiter, and when the waiter is to be answered."""

    __slots__ = ("attempt", "data", "deadline", "error", "future", "mark", "sent_at")

    def __init__(self, data: bytes, future: asyncio.Future[None], deadline: float) -> None:
        self.data = data
        self.future = future
        self.deadline = deadline
        self.error: str | None = None  # the database's error; final once this NOTIFY's Sync is back
        self.attempt = 0  # how many times it was sent
        self.mark = deadline  # when its connection is given up on if it is still unanswered
        self.sent_at = 0.0  # when it was last sent (loop time)

    def settle(self) -> None:
        """Tell the waiter, if it still waits, how the database answered."""
        if not self.future.done():
            if self.error is None:
                self.future.set_result(None)
            else:
                self.future.set_exception(NotifyFailed("database refused the message"))

    def fail(self, reason: str) -> None:
        """Give up on this message: its waiter gets NotifyFailed(reason)."""
        if not self.future.done():
            self.future.set_exception(NotifyFailed(reason))


class PipelinedConnection:
    """One connection in libpq pipeline mode that sends NOTIFYs, each followed by its own Sync.

    Each NOTIFY is therefore its own implicit transaction: identical payloads never fold into one
    notification, and a statement the database refuses aborts nothing else. A reader callback
    consumes results as they arrive and settles each message when its Sync comes back, so a batch
    costs one write and a few reads. A connection that fails or stays silent too long is broken
    (`error` says why) for good: its owner replaces it.
    """

    def __init__(self, conn: psycopg.AsyncConnection[Any], channel: bytes) -> None:
        self._conn = conn
        self._pg = conn.pgconn
        self._fd = conn.fileno()
        self._channel = channel
        self._loop = asyncio.get_running_loop()
        self._in_flight: deque[Message] = deque()  # sent or being sent, oldest first
        self._writing = False
        self._drained: asyncio.Future[None] | None = None
        self.error: str | None = None
        self.refused: list[str] = []  # errors of refused NOTIFYs, for the owner to log
        self.on_break: Callable[[], object] | None = None  # told once, when the connection breaks

    @classmethod
    async def open(
        cls,
        conninfo: str,
        kwargs: dict[str, Any],
        channel: bytes,
        within: float,
        *,
        statement: str,
    ) -> PipelinedConnection:
        """Connect, enter pipeline mode and prepare `statement`, all `within` seconds.

        `statement` takes two parameters: `channel`, then each message's data.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        async with asyncio.timeout(within):
            conn = await psycopg.AsyncConnection.connect(conninfo, **kwargs)
        self = cls(conn, channel)
        try:
            pg = self._pg
            pg.nonblocking = 1
            pg.enter_pipeline_mode()
            loop.add_reader(self._fd, self._on_readable)
            prepared = Message(b"", loop.create_future(), deadline)
            self._in_flight.append(prepared)
            pg.send_prepare(_STATEMENT, statement.encode())
            pg.pipeline_sync()
            self._flush()
            await self._wait(deadline - loop.time())
            self._check_prepared(prepared)
        except BaseException:
            await self.close()
            raise
        return self

    @property
    def unanswered(self) -> int:
        """Messages sent (or being sent) whose answer has not come back yet."""
        return len(self._in_flight)

    def _check_prepared(self, prepared: Message) -> None:
        if self.error is not None:
            raise psycopg.OperationalError(self.error)
        try:
            prepared.future.result()
        except NotifyFailed:
            raise psycopg.OperationalError(f"cannot prepare NOTIFY: {prepared.error}") from None

    @property
    def oldest(self) -> Message | None:
        """The message sent longest ago that is still unanswered, if any."""
        return self._in_flight[0] if self._in_flight else None

    def send(self, messages: list[Message]) -> None:
        """Send each message as its own transaction, without waiting: each is settled when the
        database answers it. After a break, `take_unanswered()` hands back what never was."""
        in_flight, pg, channel = self._in_flight, self._pg, self._channel
        in_flight.extend(messages)
        try:
            for message in messages:
                message.error = None
                pg.send_query_prepared(_STATEMENT, (channel, message.data))
                pg.pipeline_sync()
        except psycopg.OperationalError as exc:
            self._break(describe(exc))
        else:
            self._flush()

    def give_up(self, reason: str) -> None:
        """Break the connection for good (its owner found it too slow to answer)."""
        self._break(reason)

    def take_unanswered(self) -> list[Message]:
        """The messages sent whose answer has not come, oldest first; they are forgotten here.

        After a break they may or may not have been committed.
        """
        lost = list(self._in_flight)
        self._in_flight.clear()
        return lost

    async def exchange(self, messages: list[Message], within: float) -> list[Message]:
        """Send each message as its own transaction and settle it when the database answers.

        Returns the messages whose answer never came because the connection broke (or gave no
        answer `within` seconds): they may or may not have been committed.
        """
        self.send(messages)
        await self._wait(within)
        if self.error is None:
            return []
        return self.take_unanswered()

    async def _wait(self, within: float) -> None:
        """Until every message sent is answered or the connection breaks (silence `within`
        seconds breaks it)."""
        if not self._in_flight or self.error is not None:
            return
        self._drained = self._loop.create_future()
        timer = self._loop.call_later(
            max(within, 0.0), self._break, f"no answer within {within:.1f} s"
        )
        try:
            await self._drained
        finally:
            timer.cancel()
            self._drained = None

    def _flush(self) -> None:
        try:
            pending = self._pg.flush()
        except psycopg.OperationalError as exc:
            self._break(describe(exc))
            return
        if pending:
            if not self._writing:
                self._loop.add_writer(self._fd, self._flush)
                self._writing = True
        elif self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False

    def _on_readable(self) -> None:
        pg = self._pg
        try:
            pg.consume_input()
        except psycopg.OperationalError as exc:
            self._break(describe(exc))
            return
        in_flight = self._in_flight
        empty = 0
        while in_flight and not pg.is_busy():
            result = pg.get_result()
            if result is None:
                empty += 1
                if empty > 1:  # nothing more to read now; never spin here
                    break
                continue
            empty = 0
            status = result.status
            if status == _SYNC:
                message = in_flight.popleft()
                message.settle()
                if message.error is not None:
                    self.refused.append(message.error)
            elif status in _ERRORS and in_flight[0].error is None:
                primary = result.error_field(pq.DiagnosticField.MESSAGE_PRIMARY)
                in_flight[0].error = primary.decode(errors="replace") if primary else "error"
        if pg.status == _BAD:
            self._break(describe(psycopg.OperationalError(pg.get_error_message())))
        elif not in_flight and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _break(self, reason: str) -> None:
        if self.error is not None:
            return
        self.error = reason
        self._loop.remove_reader(self._fd)
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        if self.on_break is not None:
            self.on_break()

    async def close(self) -> None:
        """Stop watching the socket and close; a broken peer is cut off, never waited on."""
        broken = self.error is not None
        self._break("closed")
        if broken:
            sever(self._conn)
        with contextlib.suppress(psycopg.Error, OSError):
            await self._conn.close()
