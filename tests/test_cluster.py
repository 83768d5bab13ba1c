"""Several pgws nodes on their own addresses, one PostgreSQL between them (issue 14 item 3).

Each node is `pgws serve` in its own network namespace (tests/netns.py), reaching the shared
PostgreSQL over a veth pair, as gateways on separate machines would; clients connect from here to
each node's own address. Skipped, with the reason, where namespaces cannot be made (not root).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError

from dev.devdb import ThrowawayPostgres
from pgws.client import Client, Message
from tests import netns
from tests.conftest import (
    SECRET,
    TIMEOUT,
    ServeProcess,
    channel_name,
    drain_until_closed,
    make_token,
)

NODES = 3
PORT = 3000  # every node has a namespace, hence a port space, of its own

if (why := netns.unavailable()) is not None:
    pytest.skip(f"no test hosts: {why}", allow_module_level=True)


@pytest.fixture(scope="module")
def hosts() -> Iterator[list[netns.Host]]:
    with netns.hosts(NODES) as made:
        yield made


@pytest.fixture(scope="module")
def shared_db(hosts: list[netns.Host]) -> Iterator[ThrowawayPostgres]:
    """One PostgreSQL for every node, listening on each host's veth peer address."""
    addresses = ",".join(["127.0.0.1", *(host.gateway for host in hosts)])
    with ThrowawayPostgres(settings={"listen_addresses": addresses}) as postgres:
        network = hosts[0].gateway.rsplit(".", 2)[0] + ".0.0/16"
        with (postgres.datadir / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {network} trust\n")
        with psycopg.connect(postgres.uri, autocommit=True) as conn:
            conn.execute("SELECT pg_reload_conf()")
        yield postgres


class Node:
    """One `pgws serve` inside a test host."""

    def __init__(self, host: netns.Host, serving: ServeProcess) -> None:
        self.host, self.serving = host, serving

    @property
    def url(self) -> str:
        return f"ws://{self.host.address}:{PORT}"

    def connect(self, claims: dict[str, Any]) -> connect:
        return connect(
            f"{self.url}/{make_token(claims)}", open_timeout=TIMEOUT, close_timeout=TIMEOUT
        )


@pytest.fixture(params=["notify"])
async def nodes(
    request: pytest.FixtureRequest, hosts: list[netns.Host], shared_db: ThrowawayPostgres
) -> AsyncIterator[list[Node]]:
    """A node on every host, all on one LISTEN channel of the shared database (with durable
    channels when a test asks for `durable`)."""
    listen_channel = channel_name()
    extra = {"PGWS_DURABLE": "true"} if request.param == "durable" else {}
    started: list[Node] = []
    try:
        for host in hosts:
            env = {
                "PATH": os.environ.get("PATH", ""),
                "PGWS_DB_URI": f"postgresql://postgres@{host.gateway}:{shared_db.port}/postgres",
                "PGWS_JWT_SECRET": SECRET,
                "PGWS_HOST": host.address,
                "PGWS_PORT": str(PORT),
                "PGWS_LISTEN_CHANNEL": listen_channel,
                "PGWS_RETRIES": "1",
                **extra,
            }
            process = await asyncio.create_subprocess_exec(
                *host.exec_prefix, "env", "-i", *(f"{k}={v}" for k, v in env.items()),
                sys.executable, "-m", "pgws", "serve", "--json-logs",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            started.append(Node(host, ServeProcess(process)))
        for node in started:
            await node.serving.wait_for_event("server_started")
        yield started
    finally:
        for node in started:
            await node.serving.kill()


async def payloads(ws: ClientConnection, count: int) -> list[str]:
    """The next `count` envelopes' payloads (SPEC 3), bounded by TIMEOUT."""
    async with asyncio.timeout(TIMEOUT):
        return [json.loads(await ws.recv())["payload"] for _ in range(count)]


async def until_delivered(
    writer: ClientConnection, readers: list[ClientConnection], marker: str
) -> None:
    """Write `marker-N` probes until every reader has received one, then read each reader up to
    the first probe: afterwards every reader is subscribed and has nothing older pending."""
    pending = set(range(len(readers)))
    seen: dict[int, asyncio.Task[str]] = {}

    async def next_probe(ws: ClientConnection) -> str:
        while True:
            payload = json.loads(await ws.recv())["payload"]
            if payload.startswith(marker):
                return str(payload)

    async with asyncio.timeout(TIMEOUT):
        probe = 0
        while pending:
            await writer.send(f"{marker}-{probe}")
            probe += 1
            for index in list(pending):
                if index not in seen:
                    seen[index] = asyncio.create_task(next_probe(readers[index]))
                task = seen[index]
                done, _ = await asyncio.wait({task}, timeout=0.05)
                if done:
                    task.result()
                    pending.discard(index)
    # Drain the later probes still on their way, so the next read is the test's own message.
    for index, reader in enumerate(readers):
        last = f"{marker}-{probe - 1}"
        first = seen[index].result()
        while first != last:
            first = json.loads(await asyncio.wait_for(reader.recv(), TIMEOUT))["payload"]


async def test_a_message_written_on_any_node_reaches_readers_on_every_node(
    nodes: list[Node],
) -> None:
    readers = [await node.connect({"mode": "r", "channel": "room"}) for node in nodes for _ in "ab"]
    writers = [await node.connect({"mode": "w", "channel": "room"}) for node in nodes]
    try:
        await until_delivered(writers[0], readers, "ready")
        for index, writer in enumerate(writers):
            await writer.send(f"from node {index + 1}")
        for reader in readers:
            assert sorted(await payloads(reader, NODES)) == [
                f"from node {index + 1}" for index in range(NODES)
            ]
    finally:
        for ws in readers + writers:
            await ws.close()


async def test_clients_of_a_killed_node_reconnect_to_another_and_traffic_goes_on(
    nodes: list[Node],
) -> None:
    """SIGKILL one node mid-traffic: readers elsewhere miss nothing and keep the order; the killed
    node's readers see their sockets drop, reconnect to a surviving node and hear what follows."""
    first, doomed, survivor = nodes
    claims = {"mode": "r", "channel": "room"}
    steady = [await first.connect(claims), await survivor.connect(claims)]
    moving = [await doomed.connect(claims), await doomed.connect(claims)]
    writer = await first.connect({"mode": "w", "channel": "room"})
    try:
        await until_delivered(writer, steady + moving, "warm")
        for number in range(50):
            await writer.send(f"m{number}")
        for reader in moving:
            assert await payloads(reader, 50) == [f"m{number}" for number in range(50)]

        await doomed.serving.kill()
        for reader in moving:
            with pytest.raises(ConnectionClosedError):  # no close frame: the TCP connection ended
                await drain_until_closed(reader)
        for number in range(50, 100):  # written while the moving clients are away
            await writer.send(f"m{number}")
        moved = [await survivor.connect(claims) for _ in moving]
        await until_delivered(writer, moved, "back")
        for number in range(100, 150):
            await writer.send(f"m{number}")

        for reader in moved:
            assert await payloads(reader, 50) == [f"m{number}" for number in range(100, 150)]
        for reader in steady:
            got = [payload for payload in await payloads_until(reader, "m149") if payload[0] == "m"]
            assert got == [f"m{number}" for number in range(150)]
    finally:
        for ws in steady + moving + [writer]:
            await ws.close()


async def payloads_until(ws: ClientConnection, last: str) -> list[str]:
    """Every payload up to and including `last` (probes included), bounded by TIMEOUT."""
    got: list[str] = []
    async with asyncio.timeout(TIMEOUT):
        while not got or got[-1] != last:
            got.append(json.loads(await ws.recv())["payload"])
    return got


@pytest.mark.parametrize("nodes", ["durable"], indirect=True)
async def test_on_a_durable_channel_clients_of_a_killed_node_resume_elsewhere_losing_nothing(
    nodes: list[Node],
) -> None:
    """Durable mode on every node; pgws.client readers on each node; one node is SIGKILLed
    while a writer keeps publishing, its readers are pointed at a surviving node (as a load
    balancer would) and resume from their last positions: every reader ends with every
    message exactly once, in order, and no gap is reported."""
    first, doomed, survivor = nodes
    channel, count = "ledger", 300
    token = make_token({"mode": "rw", "channels": [channel]})
    gaps: list[str] = []

    def client(node: Node) -> Client:
        return Client(node.url + "/", token, on_gap=gaps.append, initial_delay=0.05,
                      max_delay=0.5, open_timeout=TIMEOUT)  # fmt: skip

    readers = [client(node) for node in (first, survivor, doomed, doomed)]
    writer = client(first)
    received: list[list[int]] = [[] for _ in readers]
    halfway = asyncio.Event()

    async def read(index: int, reader: Client) -> None:
        async for message in reader:
            assert isinstance(message, Message)
            received[index].append(int(message.data["payload"]))  # a SPEC 3 envelope
            if index >= 2 and len(received[index]) == count // 3:
                halfway.set()
            if len(received[index]) == count:
                return

    async with contextlib.AsyncExitStack() as stack:
        for each in (*readers, writer):
            await stack.enter_async_context(each)
        for reader in readers:
            await reader.subscribe(channel)
        async with asyncio.timeout(TIMEOUT * 3), asyncio.TaskGroup() as tasks:
            for index, reader in enumerate(readers):
                tasks.create_task(read(index, reader))
            for number in range(count):
                await writer.publish(channel, number)
                if number == count // 2:
                    await halfway.wait()  # the doomed node's readers are mid-stream
                    await doomed.serving.kill()
                    for reader in readers[2:]:
                        reader.url = survivor.url + "/"  # what a load balancer would now do
    problems = {
        index: (sorted(set(range(count)) - set(got))[:5], [n for n in got if got.count(n) > 1][:5])
        for index, got in enumerate(received)
        if got != list(range(count))
    }
    assert problems == {}, "reader: (missing, repeated)"
    assert all(reader.connects >= 2 for reader in readers[2:]), "the killed node's readers moved"
    assert gaps == []
