"""Sockets' writes to durable channels: stored in short batches across sockets (SPEC 7).

store() queues one (channel, payload) and waits for its position. A few writer tasks, each with
its own connection, take what is queued (up to BATCH_MAX messages or BATCH_BYTES, lingering at
most BATCH_LINGER for more), store it in one transaction (`durable.store_batch`), answer every
waiter, then send the wake-ups in a NOTIFY-only transaction of their own (a NOTIFY in the
storing transaction would serialise every commit in the cluster: design note, trap 2).

- A waiter is answered once its batch committed, so a socket that awaits each store() before the
  next (every socket does) keeps its order.
- If a batch fails, nobody in it is acknowledged: each waiter gets NotifyFailed (the socket is
  closed 1011 with the reason, as for a lost NOTIFY) and is counted in `failed`. A connection
  lost during the commit leaves the outcome unknown: such a message may still be delivered
  (at least once at the producer). Nothing is retried behind the writer's back.
- A batch the database refuses for its contents (not a lost connection) is stored again one
  message at a time, so one bad message costs only its own writer.
- A lost wake-up costs nothing but latency: the reader's reconcile finds the rows within a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any

import psycopg
import structlog

from pgws.config import Config
from pgws.db import durable
from pgws.db.connect import CONNECT_TIMEOUT, Backoff, connection_kwargs, describe, sever
from pgws.errors import NotifyFailed

log = structlog.get_logger("pgws.db.durable_writer")

WRITERS = 2  # while one batch commits, the next one gathers
BATCH_MAX = 500  # messages per transaction
BATCH_BYTES = 4 * 1024 * 1024  # payload per transaction (one message may be larger alone)
BATCH_LINGER = 0.001  # how long a batch that is not full waits for more
STORE_TIMEOUT = 5.0  # store() to answer, whatever the database does (as NOTIFY_TIMEOUT)
CLOSE_GRACE = 1.0
UNAVAILABLE = "database unavailable: the message was not stored"
_STOPPING = "server stopping: the message was not stored"


@dataclasses.dataclass(slots=True)
class _Pending:
    channel: str
    payload: str
    size: int
    future: asyncio.Future[str]
    deadline: float

    def fail(self, reason: str) -> None:
        if not self.future.done():
            self.future.set_exception(NotifyFailed(reason))


class _Refused(Exception):
    """The database refused the batch's contents (the connection itself is fine)."""


class _BeforeCommit(Exception):
    """The connection failed before the COMMIT was sent: nothing of the batch was stored."""

    def __init__(self, error: psycopg.OperationalError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclasses.dataclass(slots=True)
class _Slot:
    """One writer task's connection, opened when needed and replaced when it fails."""

    conn: psycopg.AsyncConnection[Any] | None = None

    async def discard(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            sever(conn)
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()


class DurableWriter:
    """Stores sockets' messages on durable channels, batched across sockets."""

    def __init__(self, config: Config) -> None:
        self._db_uri = config.db_uri
        self._kwargs: dict[str, Any] = {
            "autocommit": True,
            **connection_kwargs(config.db_uri, "pgws-durable-writer"),
        }
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._lifetime = contextlib.AsyncExitStack()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        # Live counters (tests read them; /metrics reads them through the bus).
        self.stored = 0  # messages committed
        self.failed = 0  # store() calls that raised NotifyFailed
        self.batches = 0  # transactions committed
        self.wakeups_failed = 0  # wake-up transactions lost (the reconcile repairs them)

    async def open(self) -> None:
        """Start the writer tasks (each connects when it first has something to store)."""
        tasks = await self._lifetime.enter_async_context(asyncio.TaskGroup())
        self._tasks = [
            tasks.create_task(self._write_forever(), name=f"durable-writer-{n}")
            for n in range(WRITERS)
        ]

    async def store(self, channel: str, payload: str) -> str:
        """Store one message; its position once committed, or NotifyFailed with a reason."""
        if self._closing or not self._tasks:
            self.failed += 1
            raise NotifyFailed(_STOPPING)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        try:
            size = len(payload) if payload.isascii() else len(payload.encode())
        except UnicodeEncodeError:
            self.failed += 1
            raise NotifyFailed("the message is not valid UTF-8") from None
        self._queue.put_nowait(
            _Pending(channel, payload, size, future, loop.time() + STORE_TIMEOUT)
        )
        try:
            return await future
        except NotifyFailed:
            self.failed += 1
            raise

    async def _write_forever(self) -> None:
        slot = _Slot()
        backoff = Backoff(initial=0.1, cap=1.0)
        try:
            while True:
                batch = await self._gather()
                try:
                    await self._store(slot, batch)
                    backoff.reset()
                except (psycopg.OperationalError, OSError) as exc:  # TimeoutError is an OSError
                    log.warning("durable_store_failed", error=describe(exc), count=len(batch))
                    for message in batch:
                        message.fail(UNAVAILABLE)
                    await slot.discard()
                    await asyncio.sleep(backoff.next())
                except Exception:  # task boundary: a bug must not strand waiters
                    log.exception("durable_writer_crashed")
                    for message in batch:
                        message.fail(UNAVAILABLE)
                finally:
                    for message in batch:
                        message.fail(_STOPPING)  # only when cancelled: the rest are settled
                        self._queue.task_done()
        finally:
            await slot.discard()

    async def _gather(self) -> list[_Pending]:
        """The next batch: what is queued, lingering briefly for more while it is not full."""
        queue = self._queue
        batch = [await queue.get()]
        size = batch[0].size
        loop = asyncio.get_running_loop()
        linger_until = loop.time() + BATCH_LINGER
        while len(batch) < BATCH_MAX and size < BATCH_BYTES:
            if queue.empty():
                left = linger_until - loop.time()
                if left <= 0:
                    break
                try:
                    async with asyncio.timeout(left):
                        message = await queue.get()
                except TimeoutError:
                    break
            else:
                message = queue.get_nowait()
            batch.append(message)
            size += message.size
        return batch

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            return await psycopg.AsyncConnection.connect(self._db_uri, **self._kwargs)

    async def _store(self, slot: _Slot, batch: list[_Pending]) -> None:
        """Store `batch` on the slot's connection, answer its waiters, send its wake-ups.

        A connection found dead before the COMMIT went out (an idle one after a database
        restart) stored nothing, so the batch goes once more on a fresh one.
        """
        live = self._live(batch)
        if not live:
            return
        for attempt in (1, 2):
            if slot.conn is None or slot.conn.closed:
                slot.conn = await self._connect()
            conn: psycopg.AsyncConnection[Any] = slot.conn
            try:
                positions = await self._commit(conn, live)
                break
            except _BeforeCommit as exc:
                await slot.discard()
                if attempt == 2:
                    raise exc.error from None
                live = self._live(live)
                if not live:
                    return
            except _Refused as exc:
                if len(live) == 1:
                    live[0].fail(f"the database refused the message: {exc}")
                    return
                log.warning(
                    "durable_batch_refused", error=str(exc), count=len(live), action="split"
                )
                for message in live:  # one bad message must not cost the others
                    await self._store(slot, [message])
                return
        for message, position in zip(live, positions, strict=True):
            if not message.future.done():
                message.future.set_result(position)
        try:
            async with asyncio.timeout(STORE_TIMEOUT):
                await durable.send_wakeups(conn, (message.channel for message in live))
        except (psycopg.OperationalError, OSError):
            self.wakeups_failed += 1
            raise  # the connection is gone: replaced; the reconcile delivers the batch

    async def _commit(self, conn: psycopg.AsyncConnection[Any], live: list[_Pending]) -> list[str]:
        """Store `live` in one transaction; _Refused for contents the database refuses,
        _BeforeCommit when the connection failed before the COMMIT was sent."""
        frames = [(message.channel, message.payload) for message in live]
        committing = False
        try:
            async with asyncio.timeout(self._time_left(live)), conn.transaction():
                positions = await durable.store_frames(conn, frames)
                committing = True  # from here on the outcome of a failure is unknown
        except psycopg.OperationalError as exc:
            if not committing:
                raise _BeforeCommit(exc) from None
            raise
        except psycopg.Error as exc:  # contents: bad channel, payload over 16 MiB, ...
            raise _Refused(describe(exc)) from None
        self.stored += len(live)
        self.batches += 1
        return positions

    def _live(self, batch: list[_Pending]) -> list[_Pending]:
        """The messages still worth storing: waiter waiting and time left (others fail)."""
        now = asyncio.get_running_loop().time()
        live = []
        for message in batch:
            if message.future.done():
                continue  # its socket went away
            if message.deadline <= now:
                message.fail(UNAVAILABLE)
                continue
            live.append(message)
        return live

    def _time_left(self, live: list[_Pending]) -> float:
        return max(live[0].deadline - asyncio.get_running_loop().time(), 0.25)

    async def close(self) -> None:
        """Store what is queued (for at most CLOSE_GRACE), then stop the writers."""
        self._closing = True
        if self._tasks:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_GRACE):
                    await self._queue.join()
            for task in self._tasks:
                task.cancel()
            await self._lifetime.aclose()
            self._tasks = []
        while not self._queue.empty():
            self._queue.get_nowait().fail(_STOPPING)
            self._queue.task_done()
