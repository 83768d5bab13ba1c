"""Shared fixtures: a real PostgreSQL, a real gateway on a free port, real WebSocket clients."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any, TextIO, cast

import psycopg
import pytest
from jose import jwt
from psycopg.conninfo import make_conninfo
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from dev.devdb import ThrowawayPostgres
from pgws import logs
from pgws.config import Config
from pgws.db import durable_schema
from pgws.server import Gateway

SECRET = "reallyreallyreallyreallyverysafe-test-secret"


def _load_factor() -> float:
    """How far the machine is past busy: the 1-minute load per core, from 1 (idle) up to 4.

    A shared machine at load 6 on 2 cores once pushed a 10 s budget over; waits stay bounded.
    """
    try:
        per_core = os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        return 1.0
    return min(max(per_core, 1.0), 4.0)


# Every bounded wait in the suite is scaled by the load and by PGWS_TEST_TIMEOUT_FACTOR (for
# machines slower still).
TIMEOUT = 10.0 * float(os.environ.get("PGWS_TEST_TIMEOUT_FACTOR", "1")) * _load_factor()

ISSUED_TOKENS: list[str] = []
LOG_LINES = io.StringIO()


def make_token(claims: dict[str, Any], secret: str = SECRET, algorithm: str = "HS256") -> str:
    """Sign claims (HS256 with the suite's secret by default); remembered for the log audit."""
    token: str = jwt.encode(claims, secret, algorithm=algorithm)
    ISSUED_TOKENS.append(token)
    return token


def channel_name() -> str:
    """A channel no other test uses."""
    return f"pgws-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session", autouse=True)
def log_audit() -> Iterator[None]:
    """Route every pgws log line of the run to one buffer; at the end, no token may be in it."""
    logs.configure(
        json=True, level=logging.DEBUG, stream=cast(TextIO, _Tee(LOG_LINES)), cache_loggers=False
    )
    yield
    text = LOG_LINES.getvalue()
    leaked = [token for token in ISSUED_TOKENS if token in text]
    assert not leaked, f"{len(leaked)} tokens appeared in the logs"
    assert SECRET not in text


class _Tee(io.TextIOBase):
    """Keeps log lines for the audit and still shows them on stderr for failing tests."""

    def __init__(self, buffer: io.StringIO) -> None:
        self._buffer = buffer

    def write(self, text: str) -> int:
        self._buffer.write(text)
        sys.stderr.write(text)
        return len(text)

    def isatty(self) -> bool:
        return False


@pytest.fixture(scope="session")
def dsn() -> Iterator[str]:
    """An existing server from PGWS_TEST_DB_URI, else a throwaway cluster started here."""
    if value := os.environ.get("PGWS_TEST_DB_URI"):
        yield value
        return
    with ThrowawayPostgres() as cluster:
        yield cluster.uri


@pytest.fixture
def cluster() -> Iterator[ThrowawayPostgres]:
    """A private cluster for tests that stop or restart the database."""
    with ThrowawayPostgres() as private:
        yield private


@pytest.fixture
async def db(dsn: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """An autocommit connection to the test database."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
async def fresh_uri(db: psycopg.AsyncConnection[Any], dsn: str) -> AsyncIterator[str]:
    """A new, empty database on the test server (no schema, its own advisory locks), dropped
    afterwards."""
    name = f"pgws_fresh_{uuid.uuid4().hex[:8]}"
    await db.execute(f"CREATE DATABASE {name}")
    try:
        yield make_conninfo(dsn, dbname=name)
    finally:
        await db.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
async def fresh(fresh_uri: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """An autocommit connection to a fresh database with the durable schema migrated."""
    async with await psycopg.AsyncConnection.connect(fresh_uri, autocommit=True) as conn:
        await durable_schema.migrate(conn)
        yield conn


@dataclasses.dataclass
class Running:
    """A gateway serving in this event loop."""

    gateway: Gateway
    config: Config
    task: asyncio.Task[None]
    stop: asyncio.Event

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.gateway.port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.gateway.port}"

    def connect(self, path: str, **kwargs: Any) -> connect:
        """Open a client socket on `path` (`/<token>` or `/<channel>/<token>`)."""
        kwargs.setdefault("open_timeout", TIMEOUT)
        kwargs.setdefault("close_timeout", TIMEOUT)
        return connect(self.url + path, **kwargs)

    async def notify(self, db: psycopg.AsyncConnection[Any], payload: Any) -> None:
        """pg_notify on the listen channel, as a database producer would."""
        text = payload if isinstance(payload, str) else json.dumps(payload)
        await db.execute("SELECT pg_notify(%s, %s)", (self.config.listen_channel, text))

    async def shutdown(self) -> None:
        self.stop.set()
        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(self.task, return_exceptions=True)


StartGateway = Callable[..., Any]


@pytest.fixture
async def start_gateway(dsn: str) -> AsyncIterator[StartGateway]:
    """Factory: start a gateway with Config overrides, on port 0, with its own listen channel."""
    started: list[Running] = []

    async def start(**overrides: Any) -> Running:
        settings: dict[str, Any] = {
            "db_uri": dsn,
            "jwt_secret": SECRET.encode(),
            "host": "127.0.0.1",
            "port": 0,
            "listen_channel": channel_name(),
            "retries": 1,
        }
        settings.update(overrides)
        config = Config(**settings)
        gateway = Gateway(config)
        ready = asyncio.Event()
        stop = asyncio.Event()
        task = asyncio.create_task(gateway.run(stop, lambda _: ready.set()), name="gateway")
        running = Running(gateway, config, task, stop)
        started.append(running)
        waiter = asyncio.create_task(ready.wait())
        async with asyncio.timeout(TIMEOUT):
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if task.done():
            task.result()  # raise what stopped it
        return running

    yield start
    for running in started:
        await running.shutdown()


@pytest.fixture
async def gateway(start_gateway: StartGateway) -> Running:
    """A gateway with default settings."""
    running: Running = await start_gateway()
    return running


async def recv_json(ws: ClientConnection) -> dict[str, Any]:
    """The next message, parsed; bounded."""
    async with asyncio.timeout(TIMEOUT):
        message = await ws.recv()
    value: dict[str, Any] = json.loads(message)
    return value


async def assert_nothing_received(ws: ClientConnection, within: float = 0.3) -> None:
    """Fail if a message arrives within `within` seconds (absence can only be shown by waiting)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            message = await ws.recv()
            raise AssertionError(f"unexpected message: {message!r}")


async def drain_until_closed(ws: Any) -> None:
    """Read everything until the connection ends (raises ConnectionClosed), bounded."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            await ws.recv()


def now() -> float:
    return time.time()


async def until(condition: Callable[[], bool], what: str = "condition") -> None:
    """Wait, bounded, until in-process state satisfies `condition` (checked every few ms)."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def subscribed(running: Running, channel: str, count: int = 1) -> None:
    """Wait until `count` sockets read `channel` (the server subscribes just after the upgrade)."""
    await until(
        lambda: len(running.gateway.registry.subscribers(channel)) >= count,
        f"{count} readers on {channel}",
    )


class ServeProcess:
    """`pgws serve` as a subprocess, its JSON log lines collected as they come."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.events: list[dict[str, Any]] = []
        self.output: list[str] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read(), name="serve-stderr")

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for line in self.process.stderr:
            text = line.decode(errors="replace")
            self.output.append(text)
            with contextlib.suppress(ValueError):
                self.events.append(json.loads(text))
            self._changed.set()
        self._changed.set()

    async def wait_for_event(self, name: str, after: int = 0) -> dict[str, Any]:
        """The first log event called `name` (from index `after`), bounded by TIMEOUT."""
        async with asyncio.timeout(TIMEOUT):
            while True:
                for event in self.events[after:]:
                    if event.get("event") == name:
                        return event
                if self._reader.done():
                    raise AssertionError(f"exited before {name!r}:\n{''.join(self.output)}")
                self._changed.clear()
                await self._changed.wait()

    async def wait_exit(self) -> int:
        """The exit status, bounded by TIMEOUT; the stderr reader drains first."""
        async with asyncio.timeout(TIMEOUT):
            code = await self.process.wait()
            await self._reader
        return code

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()
        self._reader.cancel()


@pytest.fixture
async def serve_process(dsn: str) -> AsyncIterator[Callable[..., Any]]:
    """Factory: start `pgws serve ARGS` with PGWS_* overrides (None removes a variable);
    returns (process, port) once started."""
    started: list[ServeProcess] = []

    async def start(*args: str, **env: str | None) -> tuple[ServeProcess, int]:
        given = {
            "PATH": os.environ.get("PATH", ""),
            "PGWS_DB_URI": dsn,
            "PGWS_JWT_SECRET": SECRET,
            "PGWS_HOST": "127.0.0.1",
            "PGWS_PORT": "0",
            "PGWS_LISTEN_CHANNEL": channel_name(),
            "PGWS_RETRIES": "1",
            **env,
        }
        full = {key: value for key, value in given.items() if value is not None}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pgws", "serve", "--json-logs", *args,
            env=full, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        serving = ServeProcess(process)
        started.append(serving)
        event = await serving.wait_for_event("server_started")
        return serving, int(event["port"])

    yield start
    for serving in started:
        await serving.kill()


def run_pgws(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """`python -m pgws ARGS` with only PATH and `env` in its environment, bounded."""
    return subprocess.run(
        [sys.executable, "-m", "pgws", *args],
        env={"PATH": os.environ.get("PATH", ""), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


async def signal_closes_1001_and_exits_0(serving: Any, ws: Any, sig: int) -> None:
    """Send `sig` to a `pgws serve` process: its open socket `ws` gets 1001, it exits 0."""
    serving.process.send_signal(sig)
    with pytest.raises(ConnectionClosed) as closed:
        async with asyncio.timeout(TIMEOUT):
            await ws.recv()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1001
    assert await serving.wait_exit() == 0


async def http_get(gateway: Running, path: str) -> tuple[int, dict[str, str], bytes]:
    """A minimal HTTP/1.1 GET over loopback (the server closes after each response)."""
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.gateway.port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        await writer.drain()
        raw = await reader.read()
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return status, headers, body
