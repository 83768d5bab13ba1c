"""The Notifier: pipelined senders, one transaction per NOTIFY, under real database faults."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from dev.devdb import ThrowawayPostgres
from pgws.config import Config
from pgws.db.notifier import GROW_AT, NOTIFY, NOTIFY_TIMEOUT, Notifier
from pgws.db.pipeline import Message, PipelinedConnection
from pgws.errors import NotifyFailed
from tests.conftest import TIMEOUT, channel_name, until

DB = psycopg.AsyncConnection[Any]

SENDERS = (
    "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgws-notify' "
    "AND backend_type = 'client backend' AND pid <> pg_backend_pid() "
    "AND datname = current_database()"  # other test runs may share the server, not the database
)


def config_for(db_uri: str, **overrides: Any) -> Config:
    """A Config for a Notifier alone, on a channel of its own."""
    settings: dict[str, Any] = {
        "db_uri": db_uri,
        "jwt_secret": b"unused-by-the-notifier-0123456789",
        "listen_channel": channel_name(),
        "retries": 1,
        **overrides,
    }
    return Config(**settings)


@contextlib.asynccontextmanager
async def opened(config: Config) -> AsyncIterator[Notifier]:
    """An open Notifier, closed at the end."""
    notifier = Notifier(config)
    await notifier.open()
    try:
        yield notifier
    finally:
        await notifier.close()


@contextlib.asynccontextmanager
async def listening(db_uri: str, channel: str) -> AsyncIterator[DB]:
    """A connection that LISTENs on `channel`."""
    async with await psycopg.AsyncConnection.connect(db_uri, autocommit=True) as conn:
        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        yield conn


async def received(listener: DB, count: int, quiet: float = 0.3) -> list[str]:
    """Payloads until `count` have come (bounded), then any more that come within `quiet`."""
    payloads = [n.payload async for n in listener.notifies(timeout=TIMEOUT, stop_after=count)]
    payloads += [n.payload async for n in listener.notifies(timeout=quiet)]
    return payloads


def message(data: bytes) -> Message:
    """A message for the internal send path, with a waiter of its own."""
    loop = asyncio.get_running_loop()
    return Message(data, loop.create_future(), loop.time() + TIMEOUT)


async def sender_pids(db: DB, count: int) -> list[int]:
    """The backends of the one open Notifier (`count` of them)."""
    cursor = await db.execute(SENDERS)
    pids = [int(row[0]) for row in await cursor.fetchall()]
    assert len(pids) == count, pids
    return pids


async def test_identical_payloads_in_one_batch_are_each_delivered(dsn: str) -> None:
    """Two identical NOTIFYs in one pipelined batch are two transactions: LISTEN sees both."""
    channel = channel_name()
    async with listening(dsn, channel) as listener:
        conn = await PipelinedConnection.open(
            dsn, {"autocommit": True}, channel.encode(), TIMEOUT, statement=NOTIFY
        )
        try:
            batch = [message(b"same"), message(b"same")]
            assert await conn.exchange(batch, TIMEOUT) == []
        finally:
            await conn.close()
        assert [m.future.result() for m in batch] == [None, None]
        assert await received(listener, 2) == ["same", "same"]


async def test_identical_payloads_sent_at_once_through_notify_are_each_delivered(dsn: str) -> None:
    """notify() calls made together (one sender, so one batch) never fold into one."""
    config = config_for(dsn, pool_size=1)
    async with listening(dsn, config.listen_channel) as listener, opened(config) as notifier:
        await asyncio.gather(*(notifier.notify("same") for _ in range(3)))
        assert await received(listener, 3) == ["same"] * 3
    assert (notifier.sent, notifier.failed) == (3, 0)


async def test_a_refused_notify_fails_only_its_own_message_in_the_batch(dsn: str) -> None:
    """A payload PostgreSQL refuses fails its own waiter; the rest of the batch is delivered."""
    channel = channel_name()
    async with listening(dsn, channel) as listener:
        conn = await PipelinedConnection.open(
            dsn, {"autocommit": True}, channel.encode(), TIMEOUT, statement=NOTIFY
        )
        try:
            batch = [message(b"first"), message(b"x" * 8001), message(b"last")]
            assert await conn.exchange(batch, TIMEOUT) == []
            later = [message(b"after")]
            assert await conn.exchange(later, TIMEOUT) == []  # the connection is still fine
        finally:
            await conn.close()
        assert batch[0].future.result() is None
        with pytest.raises(NotifyFailed, match="database refused the message"):
            batch[1].future.result()
        assert batch[2].future.result() is None
        assert later[0].future.result() is None
        assert conn.refused == ["payload string too long"]
        assert await received(listener, 3) == ["first", "last", "after"]


async def test_a_refused_notify_through_notify_leaves_the_others_alone(dsn: str) -> None:
    """Through notify(): the refused message raises NotifyFailed and is counted; others arrive."""
    config = config_for(dsn, pool_size=1)
    async with listening(dsn, config.listen_channel) as listener, opened(config) as notifier:
        results = await asyncio.gather(
            notifier.notify("one"),
            notifier.notify("x" * 8001),
            notifier.notify("two"),
            return_exceptions=True,
        )
        assert results[0] is None
        assert results[2] is None
        assert isinstance(results[1], NotifyFailed)
        assert await received(listener, 2) == ["one", "two"]
    assert (notifier.sent, notifier.failed) == (2, 1)


async def test_killed_sender_connections_lose_no_message_and_keep_each_writers_order(
    dsn: str, db: DB
) -> None:
    """Sender backends terminated mid-stream, three times: every message of 100 concurrent
    writers arrives at least once, each writer's in order, and no writer sees a failure."""
    config = config_for(dsn, pool_size=4)
    writers, each = 100, 40
    total = writers * each
    async with listening(dsn, config.listen_channel) as listener, opened(config) as notifier:

        async def write(writer: int) -> None:
            for seq in range(each):
                await notifier.notify(f"{writer}:{seq}")

        async def kill() -> None:
            for share in (0.2, 0.45, 0.7):
                await until(lambda: notifier.sent >= share * total, f"{share:.0%} sent")  # noqa: B023
                await db.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'pgws-notify' AND pid <> pg_backend_pid()"
                )

        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(*(write(writer) for writer in range(writers)), kill())
        payloads = await received(listener, total)
    assert notifier.failed == 0
    assert notifier.resent > 0, "no kill hit a connection with NOTIFYs in flight"
    seen: defaultdict[int, list[int]] = defaultdict(list)
    for payload in payloads:
        who, seq = payload.split(":")
        seen[int(who)].append(int(seq))
    for writer in range(writers):
        assert sorted(set(seen[writer])) == list(range(each)), f"writer {writer} lost messages"
        # A duplicate (at least once) can only follow its original: later ones wait for it.
        assert seen[writer] == sorted(seen[writer]), f"writer {writer} out of order"


async def test_a_frozen_sender_backend_costs_no_message(dsn: str, db: DB) -> None:
    """A backend stopped with SIGSTOP is given up on within the budget and the NOTIFY is sent
    again on a fresh connection (the thawed backend may deliver it too: at least once)."""
    config = config_for(dsn, pool_size=1)
    async with listening(dsn, config.listen_channel) as listener, opened(config) as notifier:
        await notifier.notify("warm up")
        (frozen,) = await sender_pids(db, 1)
        os.kill(frozen, signal.SIGSTOP)
        try:
            started = time.monotonic()
            await notifier.notify("while frozen")
            elapsed = time.monotonic() - started
        finally:
            os.kill(frozen, signal.SIGCONT)
        payloads = await received(listener, 2)
    assert elapsed < NOTIFY_TIMEOUT
    assert payloads[:2] == ["warm up", "while frozen"]
    assert set(payloads) == {"warm up", "while frozen"}


async def test_with_the_database_down_waiters_fail_promptly_and_sending_resumes(
    cluster: ThrowawayPostgres,
) -> None:
    """Database stopped: every waiter gets 'database unavailable' at once; started: sent again."""
    config = config_for(cluster.uri, pool_size=2)
    async with opened(config) as notifier:
        await notifier.notify("before")
        await asyncio.to_thread(cluster.stop, "fast")
        started = time.monotonic()
        results = await asyncio.gather(
            *(notifier.notify(f"during {index}") for index in range(20)), return_exceptions=True
        )
        elapsed = time.monotonic() - started
        assert all(isinstance(result, NotifyFailed) for result in results), results
        assert all("database unavailable" in str(result) for result in results)
        assert elapsed < NOTIFY_TIMEOUT
        await asyncio.to_thread(cluster.start)
        async with listening(cluster.uri, config.listen_channel) as listener:
            await notifier.notify("after")
            assert await received(listener, 1) == ["after"]


async def test_close_sends_what_is_queued_first(dsn: str) -> None:
    """Messages queued when close() is called are still sent."""
    config = config_for(dsn, pool_size=2)
    async with listening(dsn, config.listen_channel) as listener:
        notifier = Notifier(config)
        await notifier.open()
        writes = [asyncio.create_task(notifier.notify(f"m{index}")) for index in range(50)]
        await asyncio.sleep(0)  # every write is queued
        await notifier.close()
        await asyncio.gather(*writes)
        assert sorted(await received(listener, 50)) == sorted(f"m{index}" for index in range(50))
    with pytest.raises(NotifyFailed, match="server stopping"):
        await notifier.notify("too late")


async def test_close_returns_within_about_a_second_with_frozen_backends(dsn: str, db: DB) -> None:
    """With every sender's backend frozen, close() still returns in about CLOSE_GRACE and the
    waiters get NotifyFailed rather than hanging."""
    config = config_for(dsn, pool_size=2)
    notifier = Notifier(config)
    await notifier.open()
    frozen = await sender_pids(db, 1)  # the second opens only under load
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        writes = [asyncio.create_task(notifier.notify(f"m{index}")) for index in range(20)]
        await until(lambda: notifier.stats().in_flight == 20, "every write sent, unanswered")
        started = time.monotonic()
        await notifier.close()
        elapsed = time.monotonic() - started
        results = await asyncio.gather(*writes, return_exceptions=True)
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    assert elapsed < 1.5
    assert all(isinstance(result, NotifyFailed) for result in results), results


async def test_queue_usage_is_sampled(dsn: str) -> None:
    """sample_queue_usage_forever fills `queue_usage` with pg_notification_queue_usage()."""
    async with opened(config_for(dsn, pool_size=1)) as notifier:
        sampling = asyncio.create_task(notifier.sample_queue_usage_forever(0.05))
        try:
            await until(lambda: notifier.queue_usage is not None, "a sample")
        finally:
            sampling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampling
    assert notifier.queue_usage is not None
    assert 0.0 <= notifier.queue_usage < 1.0


async def test_one_sender_opens_at_start_and_light_load_needs_no_other(dsn: str, db: DB) -> None:
    """PGWS_POOL_SIZE is an upper bound: one connection at start, still one after a trickle."""
    async with opened(config_for(dsn, pool_size=5)) as notifier:
        for index in range(20):
            await notifier.notify(f"m{index}")
        assert notifier.stats().connections == 1
        await sender_pids(db, 1)


async def test_the_pool_grows_under_load_and_never_above_pool_size(dsn: str, db: DB) -> None:
    """Many callers at once open more senders, GROW_AT pending each, up to PGWS_POOL_SIZE."""
    config = config_for(dsn, pool_size=3)
    total = 5 * GROW_AT
    async with listening(dsn, config.listen_channel) as listener, opened(config) as notifier:
        await asyncio.gather(*(notifier.notify(f"m{index}") for index in range(total)))
        assert notifier.stats().connections == 3
        await sender_pids(db, 3)
        await asyncio.gather(*(notifier.notify(f"n{index}") for index in range(total)))
        await sender_pids(db, 3)
        payloads = await received(listener, 2 * total)
    assert sorted(payloads) == sorted(
        [f"m{index}" for index in range(total)] + [f"n{index}" for index in range(total)]
    )
    assert (notifier.sent, notifier.failed) == (2 * total, 0)


async def test_a_caller_with_notifies_pending_stays_on_one_sender_in_order(dsn: str) -> None:
    """Callers that keep several NOTIFYs in flight (by `caller`) have them delivered in order,
    while the pool grows under them."""
    config = config_for(dsn, pool_size=4)
    callers, each, window = 80, 20, 8  # 640 pending at once: more than GROW_AT
    async with listening(dsn, config.listen_channel) as listener, opened(config) as notifier:

        async def write(caller: int) -> None:
            in_flight: list[asyncio.Task[None]] = []
            for seq in range(each):
                in_flight.append(
                    asyncio.create_task(notifier.notify(f"{caller}:{seq}", caller=caller))
                )
                if len(in_flight) >= window:
                    await in_flight.pop(0)
            await asyncio.gather(*in_flight)

        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(*(write(caller) for caller in range(callers)))
        payloads = await received(listener, callers * each)
        assert notifier.stats().connections > 1
    seen: defaultdict[int, list[int]] = defaultdict(list)
    for payload in payloads:
        who, seq = payload.split(":")
        seen[int(who)].append(int(seq))
    for caller in range(callers):
        assert seen[caller] == list(range(each)), f"caller {caller}: {seen[caller]}"
