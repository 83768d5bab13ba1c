"""Hardening under real faults: frozen backends, silent networks, a database that goes away,
stalled clients, many sockets at shutdown, connection churn and file-descriptor exhaustion."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from dev.devdb import ThrowawayPostgres
from tests.conftest import (
    TIMEOUT,
    Running,
    StartGateway,
    channel_name,
    drain_until_closed,
    make_token,
    recv_json,
    subscribed,
    until,
)

DB = psycopg.AsyncConnection[Any]


class PausableProxy:
    """A TCP proxy on loopback whose forwarding can be paused: a network path gone silent."""

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self.flowing = asyncio.Event()
        self.flowing.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> PausableProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        self.flowing.set()
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target_port)
        self._writers.append(up_writer)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                await self.flowing.wait()
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            sink.close()


def uri_via(cluster_uri: str, port: int) -> str:
    """The cluster's URI with another port (the proxy's)."""
    head, _, tail = cluster_uri.rpartition(":")
    return f"{head}:{port}/{tail.split('/', 1)[1]}"


async def test_frozen_listener_backend_is_detected_by_the_probe_and_replaced(
    start_gateway: StartGateway, db: DB
) -> None:
    """A LISTEN backend stopped with SIGSTOP fails the interval probe and is replaced."""
    gateway: Running = await start_gateway(check_listener_interval=0.5)
    listener = gateway.gateway.listener
    chat = channel_name()
    frozen = listener.backend_pid
    assert frozen is not None
    async with gateway.connect(f"/{chat}/{make_token({'mode': 'r'})}") as ws:
        await subscribed(gateway, chat)
        os.kill(frozen, signal.SIGSTOP)
        try:
            await until(lambda: listener.reconnects == 1, "the frozen listener to be replaced")
            await gateway.notify(db, {"channel": chat, "payload": "after the freeze"})
            assert (await recv_json(ws))["payload"] == "after the freeze"
        finally:
            os.kill(frozen, signal.SIGCONT)
    assert listener.backend_pid != frozen


async def test_silent_network_path_is_detected_and_the_listener_reconnects(
    start_gateway: StartGateway, cluster: ThrowawayPostgres
) -> None:
    """A path that stops carrying packets (no reset) is noticed by the probe; service resumes."""
    async with PausableProxy(cluster.port) as proxy:
        gateway: Running = await start_gateway(
            db_uri=uri_via(cluster.uri, proxy.port), check_listener_interval=0.5
        )
        listener = gateway.gateway.listener
        chat = channel_name()
        async with gateway.connect(f"/{chat}/{make_token({'mode': 'rw'})}") as ws:
            await subscribed(gateway, chat)
            proxy.flowing.clear()
            await until(lambda: not listener.up.is_set(), "the silence to be noticed")
            proxy.flowing.set()
            await until(lambda: listener.up.is_set(), "the listener to reconnect")
            await ws.send("after the silence")
            assert (await recv_json(ws))["payload"] == "after the silence"


async def test_without_interval_a_database_restart_exits_69(
    serve_process: Any, cluster: ThrowawayPostgres
) -> None:
    """Exit mode: a restarted database ends the process with 69 for its supervisor."""
    serving, _port = await serve_process(PGWS_DB_URI=cluster.uri)
    await asyncio.to_thread(cluster.restart, "fast")
    assert await serving.wait_exit() == 69


async def test_database_gone_writers_get_a_reason_readers_stay_and_all_resumes(
    start_gateway: StartGateway, cluster: ThrowawayPostgres
) -> None:
    """With the database down, a write closes that socket with a reason; readers stay open."""
    gateway: Running = await start_gateway(db_uri=cluster.uri, check_listener_interval=0.5)
    chat = channel_name()
    listener = gateway.gateway.listener
    async with gateway.connect(f"/{chat}/{make_token({'mode': 'r'})}") as reader:
        await subscribed(gateway, chat)
        await asyncio.to_thread(cluster.stop, "fast")
        async with gateway.connect(f"/{chat}/{make_token({'mode': 'w'})}") as writer:
            await writer.send("into the void")
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(TIMEOUT):
                    await writer.recv()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1011
        assert "database unavailable" in closed.value.rcvd.reason
        await asyncio.to_thread(cluster.start)
        await until(lambda: listener.reconnects >= 1 and listener.up.is_set(), "reconnect")
        async with gateway.connect(f"/{chat}/{make_token({'mode': 'w'})}") as writer:
            await writer.send("back again")
            assert (await recv_json(reader))["payload"] == "back again"


async def test_meta_channel_while_the_database_is_down_does_not_block_sockets(
    start_gateway: StartGateway, cluster: ThrowawayPostgres
) -> None:
    """ConnectionOpen cannot be sent with the database down; the socket is served anyway."""
    meta = channel_name()
    gateway: Running = await start_gateway(
        db_uri=cluster.uri, check_listener_interval=0.5, meta_channel=meta
    )
    await asyncio.to_thread(cluster.stop, "fast")
    chat = channel_name()
    async with gateway.connect(f"/{chat}/{make_token({'mode': 'r'})}") as ws:
        await subscribed(gateway, chat)
        assert ws.state.name == "OPEN"


async def test_slow_consumer_is_dropped_and_a_fast_reader_misses_nothing(
    start_gateway: StartGateway, db: DB
) -> None:
    """A reader that stops reading is dropped (1008, then aborted); others get every message."""
    gateway: Running = await start_gateway(client_max_buffer=64 * 1024)
    chat = channel_name()
    token = make_token({"mode": "r"})
    count, payload = 1500, "x" * 7000  # ~10 MB: past the buffer and the kernel's (4 MB)
    stalled_sock = socket.socket()
    stalled_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled_sock.connect(("127.0.0.1", gateway.gateway.port))
    async with (
        gateway.connect(f"/{chat}/{token}", max_queue=1, sock=stalled_sock) as stalled,
        gateway.connect(f"/{chat}/{token}", max_queue=None) as fast,
    ):
        await subscribed(gateway, chat, 2)
        received = 0

        async def read_all() -> None:
            nonlocal received
            while received < count:
                await fast.recv()
                received += 1

        reading = asyncio.create_task(read_all())
        for index in range(count):
            await gateway.notify(db, {"channel": chat, "payload": payload, "n": index})
        async with asyncio.timeout(TIMEOUT):
            await reading
        await until(lambda: len(gateway.gateway.registry.subscribers(chat)) == 1, "the drop")
        assert gateway.gateway.socket_stats.slow_consumers == 1
        with pytest.raises(ConnectionClosed) as closed:
            await drain_until_closed(stalled)
    assert received == count
    # The close frame queues behind megabytes the client never read; if the client does not
    # drain them within the grace period the server aborts, and no close frame arrives at all.
    if closed.value.rcvd is not None:
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, "slow consumer")


@contextlib.asynccontextmanager
async def many_sockets(port: int, count: int, channel: str) -> AsyncIterator[list[Any]]:
    """`count` open rw sockets on one channel."""
    token = make_token({"mode": "rw"})
    stack = contextlib.AsyncExitStack()
    async with stack:
        sockets = [
            await stack.enter_async_context(
                connect(f"ws://127.0.0.1:{port}/{channel}/{token}", open_timeout=TIMEOUT)
            )
            for _ in range(count)
        ]
        yield sockets


async def test_shutdown_with_200_sockets_traffic_and_a_stalled_client_finishes_in_time(
    serve_process: Any, db: DB, dsn: str
) -> None:
    """SIGTERM with 200 sockets, messages flowing and a stalled client: exit 0 within the limit,
    and none of the process's database sessions are left."""
    marker = f"pgws-shutdown-{channel_name()}"  # the URI's application_name wins over pgws's own
    serving, port = await serve_process(
        PGWS_SHUTDOWN_TIMEOUT="3", PGWS_DB_URI=make_conninfo(dsn, application_name=marker)
    )
    assert await sessions_named(db, marker) >= 1 + 1  # the listener and the first sender
    chat = channel_name()
    stalled = socket.create_connection(("127.0.0.1", port))  # TCP only: never speaks HTTP
    try:
        async with many_sockets(port, 200, chat) as sockets:
            for ws in sockets[:20]:
                await ws.send("traffic")
            started = time.monotonic()
            serving.process.send_signal(signal.SIGTERM)
            assert await serving.wait_exit() == 0, "".join(serving.output[-20:])
            elapsed = time.monotonic() - started
    finally:
        stalled.close()
    assert elapsed < 3 + 1, f"shutdown took {elapsed:.1f} s:\n" + "".join(serving.output[-12:])
    async with asyncio.timeout(TIMEOUT):
        # Backends notice closed sockets on their own: poll the database, bounded.
        while await sessions_named(db, marker):  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def sessions_named(db: DB, application_name: str) -> int:
    """How many database sessions carry this application_name."""
    cursor = await db.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (application_name,)
    )
    row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def test_connect_disconnect_churn_leaves_nothing_behind(gateway: Running) -> None:
    """2,000 open/close cycles leave no socket, channel or subscriber behind."""
    token = make_token({"mode": "rw"})
    for index in range(2000):
        async with gateway.connect(f"/churn-{index % 50}/{token}"):
            pass
    server = gateway.gateway.server
    assert server is not None
    await until(lambda: not server.connections, "every socket to be closed")
    await until(lambda: gateway.gateway.registry.channel_count == 0, "every channel forgotten")
    assert sum(gateway.gateway.socket_stats.open_by_mode.values()) == 0


async def test_file_descriptor_exhaustion_refuses_sockets_but_the_server_survives(
    dsn: str, serve_process: Any
) -> None:
    """With RLIMIT_NOFILE low, extra clients fail, and once they go a new client gets in."""
    limit = 64
    serving, port = await serve_process()
    pid = serving.process.pid
    _soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, hard))
    opened: list[Any] = []
    failures = 0
    token = make_token({"mode": "r"})
    for _ in range(limit + 20):
        try:
            ws = await connect(f"ws://127.0.0.1:{port}/fd/{token}", open_timeout=1)
            opened.append(ws)
        except (OSError, TimeoutError, ConnectionClosed, Exception):  # noqa: BLE001
            failures += 1
            if failures == 3:
                break
    assert failures == 3
    for ws in opened:
        await ws.close()
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (1024, hard))
    async with connect(f"ws://127.0.0.1:{port}/fd/{token}", open_timeout=TIMEOUT) as ws:
        assert ws.state.name == "OPEN"
    assert serving.process.returncode is None


def rss_kib(pid: int) -> int:
    """Resident memory of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_connect_disconnect_churn_does_not_grow_the_servers_memory(
    serve_process: Any,
) -> None:
    """After a warm-up, 2,000 more open/close cycles leave `pgws serve`'s RSS about where it was."""
    serving, port = await serve_process()
    token = make_token({"mode": "rw"})

    async def cycles(count: int) -> None:
        for index in range(count):
            url = f"ws://127.0.0.1:{port}/churn-{index % 50}/{token}"
            async with connect(url, open_timeout=TIMEOUT):
                pass

    await cycles(500)  # allocator pools, caches and prepared statements settle
    before = rss_kib(serving.process.pid)
    await cycles(2000)
    after = rss_kib(serving.process.pid)
    assert after - before < 4096, f"RSS grew by {after - before} KiB over 2,000 cycles"


async def test_a_notify_lost_with_no_fresh_connection_closes_its_writer_1011(
    start_gateway: StartGateway, cluster: ThrowawayPostgres
) -> None:
    """The senders' path goes silent with a NOTIFY unanswered: it is given up on, no fresh
    connection can be had, so its writer is closed 1011 'database unavailable'. What was
    delivered before was delivered once, and nothing reached the database while it was cut off.
    """
    async with PausableProxy(cluster.port) as proxy:
        gateway: Running = await start_gateway(db_uri=uri_via(cluster.uri, proxy.port))
        channel = gateway.config.listen_channel
        async with (
            await psycopg.AsyncConnection.connect(cluster.uri, autocommit=True) as listener,
            gateway.connect(f"/{channel_name()}/{make_token({'mode': 'w'})}") as writer,
        ):
            await listener.execute(f'LISTEN "{channel}"')
            await writer.send("first")
            first = [n.payload async for n in listener.notifies(timeout=TIMEOUT, stop_after=1)]
            proxy.flowing.clear()
            await writer.send("lost")
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(TIMEOUT):
                    await writer.recv()
            later = [n.payload async for n in listener.notifies(timeout=0.3)]
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1011
        assert "database unavailable" in closed.value.rcvd.reason
        assert len(first) == 1
        assert '"payload":"first"' in first[0]
        assert later == []
        assert gateway.gateway.notifier.failed == 1
