"""NOTIFY sender and LISTEN counter at the libpq level, through psycopg's `pq` wrapper.

These are the cheapest ways Python has to push and count notifications: no per-message
coroutine, no psycopg cursor or `Notify` object. The load generator uses them so that its own
database work stays small, and the raw-psycopg baseline uses them to find PostgreSQL's limit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import pq, sql

_STATEMENT = b"pgws_bench_notify"
_PIPELINE_SYNC = pq.ExecStatus.PIPELINE_SYNC
_FATAL_ERROR = pq.ExecStatus.FATAL_ERROR


async def connect(uri: str) -> psycopg.AsyncConnection[Any]:
    """Open an autocommit connection, bounded by a timeout."""
    async with asyncio.timeout(15):
        return await psycopg.AsyncConnection.connect(uri, autocommit=True)


class PipelinedNotifier:
    """Send NOTIFYs on one connection in libpq pipeline mode, one transaction each.

    A Sync follows every statement, so each NOTIFY commits on its own (identical payloads never
    fold, one failure never aborts another) while many stay in flight; results are read back
    whenever the socket is readable. The connection is unusable through psycopg afterwards.
    """

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._conn = conn
        self._pg = conn.pgconn
        self._fd = self._pg.socket
        self._loop = asyncio.get_running_loop()
        self._writing = False
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.in_flight = 0
        self.acked = 0
        self.errors = 0
        self.error_message = ""
        self.on_ack: Callable[[int], None] | None = None  # called with `acked` after each read

    @classmethod
    async def open(
        cls, uri: str, statement: bytes = b"SELECT pg_notify($1, $2)"
    ) -> PipelinedNotifier:
        """Connect, prepare the statement (two parameters) and enter pipeline mode."""
        conn = await connect(uri)
        await conn.execute("DEALLOCATE ALL")
        notifier = cls(conn)
        pg = notifier._pg
        pg.nonblocking = 1
        pg.enter_pipeline_mode()
        pg.send_prepare(_STATEMENT, statement)
        pg.pipeline_sync()
        notifier.in_flight += 1
        notifier._loop.add_reader(notifier._fd, notifier._on_readable)
        notifier._flush()
        if not await notifier.wait_below(1, within=10) or notifier.errors:
            await notifier.close()
            raise RuntimeError(f"cannot prepare the NOTIFY statement: {notifier.error_message}")
        notifier.acked = 0  # the prepare's sync was not a NOTIFY
        return notifier

    def send(self, channel: bytes, payload: bytes) -> None:
        """Queue one NOTIFY as its own transaction; never blocks."""
        self._pg.send_query_prepared(_STATEMENT, (channel, payload))
        self._pg.pipeline_sync()
        self.in_flight += 1
        if not self._writing:
            self._flush()

    def send_many(self, channel: bytes, payloads: list[bytes]) -> None:
        """Queue several NOTIFYs as one transaction (one Sync after them all); never blocks."""
        for payload in payloads:
            self._pg.send_query_prepared(_STATEMENT, (channel, payload))
        self._pg.pipeline_sync()
        self.in_flight += 1
        if not self._writing:
            self._flush()

    async def wait_below(self, limit: int, within: float) -> bool:
        """Wait until fewer than `limit` NOTIFYs are in flight; False on timeout.

        Any number of coroutines may wait at once, each with its own limit.
        """
        if self.in_flight < limit:
            return True
        waiter = self._loop.create_future()
        entry = (limit, waiter)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(within):
                await waiter
        except TimeoutError:
            return False
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)
        return True

    def _flush(self) -> None:
        if self._pg.flush() == 1:
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
            self.error_message = str(exc)
            self._loop.remove_reader(self._fd)
            self._wake(force=True)
            return
        while self.in_flight and not pg.is_busy():
            result = pg.get_result()
            if result is None:
                continue
            status = result.status
            if status == _PIPELINE_SYNC:
                self.in_flight -= 1
                self.acked += 1
            elif status == _FATAL_ERROR:
                self.errors += 1
                self.error_message = (result.error_message or b"").decode(errors="replace")
        if self.on_ack is not None:
            self.on_ack(self.acked)
        self._wake()

    def _wake(self, *, force: bool = False) -> None:
        if not self._waiters:
            return
        waiting = []
        for limit, waiter in self._waiters:
            if force or self.in_flight < limit:
                if not waiter.done():
                    waiter.set_result(None)
            else:
                waiting.append((limit, waiter))
        self._waiters = waiting

    async def close(self) -> None:
        """Stop watching the socket and close the connection."""
        self._loop.remove_reader(self._fd)
        if self._writing:
            self._loop.remove_writer(self._fd)
        self._pg.finish()
        await self._conn.close()


class NotifyCounter:
    """Count notifications on one channel from a dedicated LISTEN connection.

    `on_count` (if set) is called after each read with the new total, so a driver can wake up
    without polling. Payloads are not decoded: counting is all this is for.
    """

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._conn = conn
        self._pg = conn.pgconn
        self._fd = self._pg.socket
        self._loop = asyncio.get_running_loop()
        self.count = 0
        self.on_count: Callable[[int], None] | None = None
        self.error_message = ""

    @classmethod
    async def open(cls, uri: str, channel: str) -> NotifyCounter:
        """Connect, LISTEN on `channel` and start counting."""
        conn = await connect(uri)
        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        counter = cls(conn)
        counter._loop.add_reader(counter._fd, counter._on_readable)
        return counter

    def _on_readable(self) -> None:
        pg = self._pg
        try:
            pg.consume_input()
        except psycopg.OperationalError as exc:
            self.error_message = str(exc)
            self._loop.remove_reader(self._fd)
            return
        count = self.count
        notifies = pg.notifies
        while notifies() is not None:
            count += 1
        self.count = count
        if self.on_count is not None:
            self.on_count(count)

    async def close(self) -> None:
        """Stop counting and close the connection."""
        self._loop.remove_reader(self._fd)
        await self._conn.close()
