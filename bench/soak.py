"""Soak test: readers and writers on one channel for a set time while the database side fails.

    make soak                               # 60 s, 20 readers, 5 writers x 50 msg/s
    .venv/bin/python bench/soak.py --quick  # 20 s, a fault every 4 s (each kind once)
    .venv/bin/python bench/soak.py --duration 300 --readers 50 --faults fast,immediate
    make soak-durable                       # the same with durable channels (or DURABLE=1)

Not a CI test: it takes a minute, and it reports figures for a person to read. Everything runs on
127.0.0.1: a throwaway PostgreSQL (dev.devdb) and one `pgws serve` subprocess with
PGWS_CHECK_LISTENER_INTERVAL=500 (so it heals itself) on port 0; the port comes from its
`server_started` log line. Its JSON log goes to bench/results/raw/soak-<time>.log, next to
soak-<time>.json with the figures below, per fault and per lost message. Readers (mode r) and
writers (mode w) share one channel; each writer sends `{"w": writer, "seq": n, "t": send time}`
at a steady rate. A probe pair on a second channel measures recovery.

Faults, in turn, every --fault-interval seconds (the next one waits for recovery from the last):

    listener   pg_terminate_backend of the LISTEN backend (application_name pgws-listener)
    pool       pg_terminate_backend of every pool backend (application_name pgws-notify)
    fast       pg_ctl stop -m fast, then start
    immediate  pg_ctl stop -m immediate (a crash, then crash recovery), then start

An outage window runs from just before a fault is injected until the gateway is healthy again:
GET /ready answers 200, then a probe message round-trips (a probe goes out every 20 ms until one
arrives; the window ends when it does), then /ready still answers 200. Only faults that take the
LISTEN connection down open a window: killed pool connections must cost no message (issue 4,
item 10), so messages sent around a pool kill are held to the full standard; its recovery time
is shown all the same.

Accounting:

- refused: a writer socket closed by the server (1011 "database unavailable: the message was not
  sent") stops there. The gateway handles one socket's frames in order and closes it at the first
  NOTIFY that fails, so the frames sent on it after the last one that any reader received were
  not sent (or were sent while the listener was down, which loses them by design). They are
  counted as refused, not lost; the writer reconnects with back-off. Refusals outside windows
  are shown on their own line.
- lost: an accepted (not refused) message that some reader did not receive although that
  reader was connected from 0.2 s before the send (time for the server to subscribe it) until
  2 s after; readers that drop reconnect, and the gap excuses them.
- lost inside windows: expected; notifications sent while the listener is down are lost (SPEC 4).
- lost in guard bands: sent within --guard seconds (default 0.5) before a window opens or after
  it closes; shown separately, so the band hides nothing. Before: a frame sent just before the
  injection can still be on its way (writer socket, gateway, NOTIFY, LISTEN backend) when the
  fault lands; that trip is one delivery latency, milliseconds here (the summary prints p99 and
  max), so 0.5 s leaves a hundredfold margin. After: nothing needs it by design (a message sent
  after the probe arrived is NOTIFYed after the probe was, to a LISTEN connection that is up);
  it absorbs scheduling delay in this process, which shares the CPU with the gateway and
  PostgreSQL, when it timestamps the probe's arrival.
- lost outside windows: everything else. It must be 0.

Durable mode (--durable; SPEC 7): the gateway runs with PGWS_DURABLE=true on a cluster with
synchronous_commit on (a commit is acknowledged once its WAL is written, so an immediate stop
keeps it), and --producers SQL producers (default 2, --producer-rate 50 msg/s each) call
`pgws.send` on the soak channel, one transaction per message, reconnecting after a failure. The
faults also hit the durable bus's connections (listener: pgws-durable-reader too; pool:
pgws-durable-writer too). Refused means the same for a producer as for a socket: a call that
raised and whose message no reader got. The standard is higher: lost = 0 inside the windows and
guard bands too (what was committed is caught up once the gateway is back), duplicates = 0, and
per-channel order errors = 0: every reader's arrivals must follow the offsets the messages got
in pgws.message (read at the end).

Exit status: 0 pass (durable mode: nothing lost anywhere, no duplicate, no order error); 1 lost
outside windows (or, durable, anywhere), or the gateway exited or did not recover; 2 the run
could not be set up; 130 on Ctrl-C, 143 on SIGTERM (every process started here is stopped
first).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/soak.py`: make `bench` and `pgws` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import itertools
import json
import math
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Sequence
from typing import IO, Any

import psycopg
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.protocol import State

from bench.wire import make_token
from dev.devdb import DEFAULT_SETTINGS, StopMode, ThrowawayPostgres

REPO = Path(__file__).resolve().parent.parent
RAW = REPO / "bench" / "results" / "raw"
HOST = "127.0.0.1"
SECRET = "pgws-soak-secret-0123456789abcdef"
CHANNEL = "soak"
PROBE_CHANNEL = "soak-probe"
FAULT_KINDS = ("listener", "pool", "fast", "immediate")
OUTAGE_KINDS = frozenset({"listener", "fast", "immediate"})  # they take the LISTEN link down
APPLICATION_NAMES = {"listener": ("pgws-listener",), "pool": ("pgws-notify",)}
# Durable mode (--durable): the same faults hit the durable bus's connections as well.
DURABLE_APPLICATION_NAMES = {
    "listener": ("pgws-listener", "pgws-durable-reader"),
    "pool": ("pgws-notify", "pgws-durable-writer"),
}
PRODUCER_IDENT = 1000  # SQL producers' idents start here (writers' from 0)
PRODUCER_TIMEOUT = 10.0  # one pgws.send call, connection included

START_TIMEOUT = 30.0  # seconds for the gateway to log server_started, and for clients to connect
RECOVERY_TIMEOUT = 60.0  # seconds from a fault to a healthy gateway before the run fails
ADMIN_TIMEOUT = 10.0  # one pg_terminate_backend round, connection included
EXIT_POLL = 0.002  # seconds between checks that a terminated backend has exited
HTTP_TIMEOUT = 2.0  # one GET /ready
OPEN_TIMEOUT = 5.0  # one WebSocket handshake
CLOSE_TIMEOUT = 2.0  # one WebSocket closing handshake
SEND_TIMEOUT = 10.0  # one frame into a socket whose peer stopped reading
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL for the gateway
WRITERS_STOP_TIMEOUT = SEND_TIMEOUT + CLOSE_TIMEOUT + OPEN_TIMEOUT  # the longest a writer is busy
PROBE_PERIOD = 0.02  # seconds between probes while waiting for one to arrive
READY_POLL = 0.05  # seconds between GET /ready while it answers 503
MIN_GAP = 2.0  # seconds of calm between one recovery and the next fault
MIN_TAIL = 2.0  # no fault this close to the end of the run
DRAIN_QUIET = 1.0  # after the writers stop: this long without a message means delivery is done
DRAIN_MAX = 15.0
SUBSCRIBE_MARGIN = 0.2  # a reader counts for messages sent this long after its socket opened
DELIVERY_BOUND = 2.0  # ... and until this long before it dropped
RECONNECT_MIN, RECONNECT_MAX = 0.1, 2.0  # client back-off, doubling
BACKOFF_RESET = 1.0  # a socket that lived this long resets its back-off
LOST_EXAMPLES = 10
SLOW = 0.1  # seconds: deliveries slower than this are located in time in the summary

CLIENT_OPTIONS: dict[str, Any] = {
    "proxy": None,  # never through a proxy from the environment: loopback only
    "compression": None,
    "open_timeout": OPEN_TIMEOUT,
    "close_timeout": CLOSE_TIMEOUT,
    "max_queue": 1024,
}

Key = tuple[int, int]  # (writer, seq)


class SoakError(Exception):
    """The run could not go on: the gateway or the database did not do what was needed."""


# --- what happened -------------------------------------------------------------------------------


@dataclasses.dataclass
class Fault:
    """One injected fault; end is when the gateway was healthy again (None: it never was)."""

    kind: str
    start: float
    detail: str = ""
    end: float | None = None

    @property
    def outage(self) -> bool:
        """Whether this fault takes the LISTEN connection down, which loses messages by design."""
        return self.kind in OUTAGE_KINDS


@dataclasses.dataclass
class Session:
    """One writer socket, from open to close."""

    opened: float
    seqs: list[int] = dataclasses.field(default_factory=list)
    closed: float | None = None
    code: int | None = None
    reason: str = ""
    by_server: bool = False  # closed by the server or the network, not by us at the end

    def end(self, code: int | None, reason: str) -> None:
        """Record that the server (or the network) ended this socket."""
        if self.closed is None:
            self.closed, self.code, self.reason, self.by_server = time.time(), code, reason, True


@dataclasses.dataclass
class Writer:
    """One writer: what it sent (seq -> send time) and on which sockets."""

    ident: int
    sent: dict[int, float] = dataclasses.field(default_factory=dict)
    sessions: list[Session] = dataclasses.field(default_factory=list)
    connect_failures: int = 0


@dataclasses.dataclass
class Interval:
    """A span during which a reader's socket was open; closed None = open until the end."""

    opened: float
    closed: float | None = None

    def covers(self, sent_at: float) -> bool:
        """Whether a message sent then had to reach this socket."""
        if self.opened + SUBSCRIBE_MARGIN > sent_at:
            return False
        return self.closed is None or self.closed >= sent_at + DELIVERY_BOUND


@dataclasses.dataclass
class Reader:
    """One reader: what it received ((writer, seq) -> arrival time) and when it was connected."""

    ident: int
    received: dict[Key, float] = dataclasses.field(default_factory=dict)
    intervals: list[Interval] = dataclasses.field(default_factory=list)
    duplicates: int = 0
    malformed: int = 0
    drops: list[tuple[float, int | None, str]] = dataclasses.field(default_factory=list)
    connected: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def covers(self, sent_at: float) -> bool:
        """Whether this reader was connected for the whole life of a message sent then."""
        return any(interval.covers(sent_at) for interval in self.intervals)

    def take(self, raw: str | bytes, now: float) -> None:
        """Record one notification: the writer's frame is the envelope's payload; a SQL
        producer's payload (durable mode) arrives as it was sent."""
        try:
            body = json.loads(raw)
            if "payload" in body:
                body = json.loads(body["payload"])
            key = (int(body["w"]), int(body["seq"]))
        except (ValueError, KeyError, TypeError):
            self.malformed += 1
            return
        if key in self.received:
            self.duplicates += 1
        else:
            self.received[key] = now


class Activity:
    """When any reader last received something (to tell when delivery has finished)."""

    def __init__(self) -> None:
        self.last = time.time()


# --- the gateway under test ----------------------------------------------------------------------


class GatewayProcess:
    """`pgws serve` as a subprocess on 127.0.0.1, logging JSON lines to a file."""

    def __init__(self, process: asyncio.subprocess.Process, log_path: Path, port: int) -> None:
        self.process = process
        self.log_path = log_path
        self.port = port
        self.stopping = False

    @property
    def url(self) -> str:
        """The WebSocket base URL."""
        return f"ws://{HOST}:{self.port}"

    @classmethod
    async def start(
        cls, db_uri: str, log_path: Path, pool_size: int, *, durable: bool = False
    ) -> GatewayProcess:
        """Start it and wait (bounded) for its `server_started` line, which names the port."""
        env = {
            "PATH": os.environ.get("PATH", ""),
            "PGWS_DB_URI": db_uri,
            "PGWS_JWT_SECRET": SECRET,
            "PGWS_HOST": HOST,
            "PGWS_PORT": "0",
            "PGWS_CHECK_LISTENER_INTERVAL": "500",
            "PGWS_POOL_SIZE": str(pool_size),
            "PGWS_DURABLE": "true" if durable else "false",
        }
        log_file = _open_log(log_path)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pgws", "serve", "--json-logs",
                env=env, cwd=REPO, stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file, stderr=log_file,
            )  # fmt: skip
        finally:
            log_file.close()  # the child holds its own descriptor
        gateway = cls(process, log_path, port=0)
        try:
            async with asyncio.timeout(START_TIMEOUT):
                gateway.port = await gateway._started_port()
        except BaseException:
            await gateway.stop()
            raise
        return gateway

    async def _started_port(self) -> int:
        while True:
            for event in read_log(self.log_path):
                if event.get("event") == "server_started":
                    return int(event["port"])
            if self.process.returncode is not None:
                raise SoakError(f"pgws serve exited with {self.process.returncode} at start-up")
            await asyncio.sleep(0.05)

    async def watch(self) -> None:
        """Return only when asked to stop; raise if the process exits during the run."""
        code = await self.process.wait()
        if not self.stopping:
            raise SoakError(f"pgws serve exited with {code} during the run; see {self.log_path}")

    async def ready(self) -> int:
        """The status of GET /ready (0 when no answer came)."""
        try:
            async with asyncio.timeout(HTTP_TIMEOUT):
                reader, writer = await asyncio.open_connection(HOST, self.port)
                try:
                    writer.write(
                        b"GET /ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
                    )
                    status_line = await reader.readline()
                finally:
                    writer.close()
        except (OSError, TimeoutError):
            return 0
        parts = status_line.split()
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0

    async def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within STOP_TIMEOUT; return its status."""
        self.stopping = True
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    await self.process.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        return self.process.returncode


def _open_log(path: Path) -> IO[bytes]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("wb")


def read_log(path: Path) -> list[dict[str, Any]]:
    """The gateway's JSON log lines so far (other lines skipped)."""
    events = []
    with contextlib.suppress(OSError), path.open(encoding="utf-8", errors="replace") as file:
        for line in file:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    events.append(event)
    return events


def log_time(event: dict[str, Any]) -> float | None:
    """A log line's timestamp as UNIX time."""
    try:
        return datetime.datetime.fromisoformat(str(event["timestamp"])).timestamp()
    except (KeyError, ValueError):
        return None


# --- clients -------------------------------------------------------------------------------------


def path(channel: str, mode: str) -> str:
    """`/<channel>/<token>` for a token that grants that channel in that mode."""
    return f"/{channel}/{make_token(SECRET, {'mode': mode, 'channels': [channel]})}"


async def sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    """Sleep, but wake as soon as `stop` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def read_forever(reader: Reader, url: str, activity: Activity) -> None:
    """Keep one reader connected (reconnecting with back-off) and record what arrives."""
    delay = RECONNECT_MIN
    target = url + path(CHANNEL, "r")
    while True:
        interval: Interval | None = None
        code: int | None = None
        reason = ""
        try:
            async with connect(target, **CLIENT_OPTIONS) as ws:
                interval = Interval(time.time())
                reader.intervals.append(interval)
                reader.connected.set()
                async for raw in ws:
                    now = time.time()
                    reader.take(raw, now)
                    activity.last = now
                code, reason = ws.close_code, ws.close_reason or ""
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None
            reason = exc.rcvd.reason if exc.rcvd is not None else str(exc)
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            reason = f"connect failed: {exc}"
        now = time.time()
        if interval is not None:
            interval.closed = now
            delay = RECONNECT_MIN if now - interval.opened >= BACKOFF_RESET else delay
        reader.drops.append((now, code, reason))
        await asyncio.sleep(delay)
        delay = min(delay * 2, RECONNECT_MAX)


async def write_until(writer: Writer, url: str, rate: float, stop: asyncio.Event) -> None:
    """Send sequence-numbered frames at `rate` until `stop`; reconnect when the server closes.

    Ticks missed while disconnected are skipped, not sent in a burst afterwards.
    """
    period = 1.0 / rate
    next_at = time.monotonic() + random.uniform(0.0, period)  # writers out of step
    delay = RECONNECT_MIN
    target = url + path(CHANNEL, "w")
    while not stop.is_set():
        session: Session | None = None
        try:
            async with connect(target, **CLIENT_OPTIONS) as ws:
                session = Session(time.time())
                writer.sessions.append(session)
                while True:
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                    next_at = max(next_at + period, time.monotonic())
                    if stop.is_set() or ws.state is not State.OPEN:
                        break
                    await send_one(writer, session, ws)
                if not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(CLOSE_TIMEOUT):
                            await ws.wait_closed()
                    session.end(ws.close_code, ws.close_reason or "")
        except ConnectionClosed as exc:
            if session is not None:
                rcvd = exc.rcvd
                session.end(rcvd.code if rcvd else None, rcvd.reason if rcvd else str(exc))
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            if session is None:
                writer.connect_failures += 1
            else:
                session.end(None, f"{type(exc).__name__}: {exc}")
        if session is not None and session.closed is not None:
            delay = RECONNECT_MIN if session.closed - session.opened >= BACKOFF_RESET else delay
        await sleep_unless(stop, delay)
        delay = min(delay * 2, RECONNECT_MAX)


async def send_one(writer: Writer, session: Session, ws: ClientConnection) -> None:
    """Send the next frame; it counts as sent once it is handed to the socket."""
    seq = len(writer.sent)
    sent_at = time.time()
    writer.sent[seq] = sent_at
    session.seqs.append(seq)
    async with asyncio.timeout(SEND_TIMEOUT):
        await ws.send(json.dumps({"w": writer.ident, "seq": seq, "t": sent_at}))


async def produce_until(writer: Writer, db_uri: str, rate: float, stop: asyncio.Event) -> None:
    """A SQL producer (durable mode): `pgws.send` of sequence-numbered payloads at `rate`.

    Each call is its own transaction on one connection, so its messages commit in order. A call
    that fails ends the session (as a server-closed socket does): the frames of it no reader got
    count as refused. A call whose answer was lost may still have committed (at-least-once at the
    producer); if a reader got it, it is delivered, not refused.
    """
    period = 1.0 / rate
    next_at = time.monotonic() + random.uniform(0.0, period)
    delay = RECONNECT_MIN
    while not stop.is_set():
        session: Session | None = None
        try:
            async with asyncio.timeout(PRODUCER_TIMEOUT):
                conn = await psycopg.AsyncConnection.connect(
                    db_uri, autocommit=True, application_name="pgws-soak-producer"
                )
            async with conn:
                session = Session(time.time())
                writer.sessions.append(session)
                while True:
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                    next_at = max(next_at + period, time.monotonic())
                    if stop.is_set():
                        break
                    seq = len(writer.sent)
                    sent_at = time.time()
                    writer.sent[seq] = sent_at
                    session.seqs.append(seq)
                    body = json.dumps({"w": writer.ident, "seq": seq, "t": sent_at})
                    async with asyncio.timeout(PRODUCER_TIMEOUT):
                        await conn.execute("SELECT pgws.send(%s, %s)", (CHANNEL, body))
        except (psycopg.Error, OSError, TimeoutError) as exc:
            if session is None:
                writer.connect_failures += 1
            else:
                session.end(None, f"{type(exc).__name__}: {str(exc).strip()[:80]}")
        if session is not None and session.closed is not None:
            delay = RECONNECT_MIN if session.closed - session.opened >= BACKOFF_RESET else delay
        await sleep_unless(stop, delay)
        delay = min(delay * 2, RECONNECT_MAX)


async def stored_offsets(db_uri: str) -> dict[Key, int]:
    """Durable mode: each stored message's offset in the soak channel, by (writer, seq)."""
    async with await psycopg.AsyncConnection.connect(db_uri, autocommit=True) as conn:
        cur = await conn.execute(
            'SELECT "offset", payload FROM pgws.message WHERE channel = %s', (CHANNEL,)
        )
        rows = await cur.fetchall()
    offsets: dict[Key, int] = {}
    for offset, payload in rows:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            body = json.loads(payload)
            if "payload" in body:
                body = json.loads(body["payload"])
            offsets[(int(body["w"]), int(body["seq"]))] = int(offset)
    return offsets


def order_errors(readers: Sequence[Reader], offsets: dict[Key, int]) -> int:
    """Arrivals, over all readers, at an offset lower than one the same reader got before.

    A reader's `received` keeps arrival order (first arrival of each message).
    """
    errors = 0
    for reader in readers:
        highest = -1
        for key in reader.received:
            offset = offsets.get(key)
            if offset is None:
                continue
            if offset < highest:
                errors += 1
            highest = max(highest, offset)
    return errors


class Probe:
    """A writer and a reader on a channel of their own: has a message made the round trip?"""

    def __init__(self, url: str) -> None:
        self._url = url
        self._round = 0
        self._arrival: asyncio.Future[float] | None = None
        self._writer: ClientConnection | None = None
        self.connected = asyncio.Event()

    async def read_forever(self) -> None:
        """Keep the probe reader connected and resolve the current round when its probe comes."""
        target = self._url + path(PROBE_CHANNEL, "r")
        while True:
            with contextlib.suppress(ConnectionClosed, OSError, TimeoutError, InvalidHandshake):
                async with connect(target, **CLIENT_OPTIONS) as ws:
                    self.connected.set()
                    async for raw in ws:
                        self._arrived(raw, time.time())
            await asyncio.sleep(RECONNECT_MIN)

    def _arrived(self, raw: str | bytes, now: float) -> None:
        try:
            round_id = json.loads(json.loads(raw)["payload"])["probe"]
        except (ValueError, KeyError, TypeError):
            return
        arrival = self._arrival
        if round_id == self._round and arrival is not None and not arrival.done():
            arrival.set_result(now)

    async def round_trip(self) -> float:
        """Send probes until one arrives (callers bound the wait); return its arrival time."""
        self._round += 1
        arrival = self._arrival = asyncio.get_running_loop().create_future()
        try:
            while True:
                await self._send(json.dumps({"probe": self._round}))
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(asyncio.shield(arrival), PROBE_PERIOD)
        finally:
            self._arrival = None

    async def _send(self, text: str) -> None:
        """Send one probe, reconnecting first if the server closed the probe writer."""
        if self._writer is None or self._writer.state is not State.OPEN:
            await self.close()
            try:
                self._writer = await connect(self._url + path(PROBE_CHANNEL, "w"), **CLIENT_OPTIONS)
            except (OSError, TimeoutError, InvalidHandshake):
                return
        with contextlib.suppress(ConnectionClosed, TimeoutError):
            async with asyncio.timeout(SEND_TIMEOUT):
                await self._writer.send(text)

    async def close(self) -> None:
        """Close the probe writer, if open."""
        ws, self._writer = self._writer, None
        if ws is not None:
            with contextlib.suppress(ConnectionClosed, OSError, TimeoutError):
                await ws.close()


# --- faults --------------------------------------------------------------------------------------


async def terminate_backends(
    db_uri: str, application_names: Sequence[str]
) -> tuple[float, list[int]]:
    """pg_terminate_backend every backend with those application_names; wait until they are gone.

    Returns when the statement was issued (the fault's start) and the pids. The wait matters: a
    probe must not reach a LISTEN backend that is about to exit. pg_terminate_backend's own wait
    sleeps 100 ms per backend, so this script checks the processes itself (same host, as root).
    """
    async with asyncio.timeout(ADMIN_TIMEOUT):
        conn = await psycopg.AsyncConnection.connect(
            db_uri, autocommit=True, application_name="pgws-soak"
        )
        async with conn:
            # Two statements: in one, the planner may call pg_terminate_backend() before it
            # filters on application_name, and so terminate every backend, this one included.
            cursor = await conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = ANY(%s)",
                (list(application_names),),
            )
            pids = [int(row[0]) for row in await cursor.fetchall()]
            started = time.time()
            cursor = await conn.execute(
                "SELECT pid FROM unnest(%s::int[]) AS pid WHERE pg_terminate_backend(pid)", (pids,)
            )
            terminated = [int(row[0]) for row in await cursor.fetchall()]
        for pid in terminated:
            await exited(pid)
    return started, terminated


async def exited(pid: int) -> None:
    """Return once no process has that pid (a zombie counts until its parent reaps it)."""
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:  # someone else's process, but there
            pass
        await asyncio.sleep(EXIT_POLL)


async def inject(kind: str, cluster: ThrowawayPostgres, *, durable: bool = False) -> Fault:
    """Inject one fault; its start is taken just before it lands."""
    names = DURABLE_APPLICATION_NAMES if durable else APPLICATION_NAMES
    if kind in names:
        started, pids = await terminate_backends(cluster.uri, names[kind])
        what = "backend" if len(pids) == 1 else "backends"
        return Fault(kind, started, f"{len(pids)} {what} terminated ({', '.join(map(str, pids))})")
    mode: StopMode = "fast" if kind == "fast" else "immediate"
    started = time.time()
    try:
        await asyncio.to_thread(cluster.stop, mode)
        stopped = time.time()
        await asyncio.to_thread(cluster.start)
    except RuntimeError as exc:
        raise SoakError(f"the database did not restart: {exc}") from None
    return Fault(
        kind,
        started,
        f"stop {stopped - started:.2f} s, database down {time.time() - started:.2f} s",
    )


async def recovered(gateway: GatewayProcess, probe: Probe) -> float:
    """Wait (unbounded: callers bound it) until /ready is 200 and a probe round-trips.

    Returns the probe's arrival time: the end of the outage window.
    """
    while True:
        if await gateway.ready() != 200:
            await asyncio.sleep(READY_POLL)
            continue
        arrived = await probe.round_trip()
        if await gateway.ready() == 200:
            return arrived


async def run_faults(
    options: Options,
    cluster: ThrowawayPostgres,
    gateway: GatewayProcess,
    probe: Probe,
    started: float,
) -> list[Fault]:
    """Inject faults in turn on schedule, each once the gateway recovered from the last."""
    faults: list[Fault] = []
    if not options.faults:
        return faults
    kinds = itertools.cycle(options.faults)
    calm_from = started
    for number in itertools.count(1):
        at = max(started + number * options.fault_interval, calm_from + MIN_GAP)
        if at > started + options.duration - MIN_TAIL:
            break
        await asyncio.sleep(max(0.0, at - time.time()))
        fault = await inject(next(kinds), cluster, durable=options.durable)
        faults.append(fault)
        try:
            async with asyncio.timeout(RECOVERY_TIMEOUT):
                fault.end = await recovered(gateway, probe)
        except TimeoutError:
            fault.detail += f"; not healthy again after {RECOVERY_TIMEOUT:.0f} s"
            break
        calm_from = fault.end
    return faults


# --- the run -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Options:
    """What to run, from the command line."""

    duration: float
    readers: int
    writers: int
    rate: float
    fault_interval: float
    faults: tuple[str, ...]
    guard: float
    pool_size: int
    durable: bool = False
    producers: int = 0  # SQL producers (pgws.send), durable mode only
    producer_rate: float = 0.0


@dataclasses.dataclass
class Run:
    """Everything recorded during one run."""

    started: float
    writing_stopped: float
    ended: float
    writers: list[Writer]
    readers: list[Reader]
    faults: list[Fault]
    producers: list[Writer] = dataclasses.field(default_factory=list)


async def drive(options: Options, cluster: ThrowawayPostgres, gateway: GatewayProcess) -> Run:
    """Connect everyone, write for the duration while faults land, drain, and disconnect."""
    url = gateway.url
    activity = Activity()
    readers = [Reader(ident) for ident in range(options.readers)]
    writers = [Writer(ident) for ident in range(options.writers)]
    producers = [Writer(PRODUCER_IDENT + ident) for ident in range(options.producers)]
    probe = Probe(url)
    stop_writing = asyncio.Event()
    async with asyncio.TaskGroup() as tasks:
        watching = tasks.create_task(gateway.watch(), name="gateway-watch")
        background = [
            tasks.create_task(read_forever(reader, url, activity), name=f"reader-{reader.ident}")
            for reader in readers
        ]
        background.append(tasks.create_task(probe.read_forever(), name="probe-reader"))
        try:
            async with asyncio.timeout(START_TIMEOUT):
                for waiting in [probe.connected, *(reader.connected for reader in readers)]:
                    await waiting.wait()
                await recovered(gateway, probe)  # every socket subscribed, the path works
        except TimeoutError:
            raise SoakError(
                "the readers did not connect, or no probe made the round trip"
            ) from None
        await asyncio.sleep(SUBSCRIBE_MARGIN)

        started = time.time()
        writing = [
            tasks.create_task(
                write_until(writer, url, options.rate, stop_writing), name=f"writer-{writer.ident}"
            )
            for writer in writers
        ]
        writing += [
            tasks.create_task(
                produce_until(producer, cluster.uri, options.producer_rate, stop_writing),
                name=f"producer-{producer.ident}",
            )
            for producer in producers
        ]
        faulting = tasks.create_task(
            run_faults(options, cluster, gateway, probe, started), name="faults"
        )
        await asyncio.sleep(options.duration)
        stop_writing.set()
        async with asyncio.timeout(WRITERS_STOP_TIMEOUT):
            await asyncio.gather(*writing)
        writing_stopped = time.time()
        async with asyncio.timeout(RECOVERY_TIMEOUT + ADMIN_TIMEOUT):
            faults = await faulting  # a restart near the end may still be recovering
        await drain(activity)
        ended = time.time()
        for task in background:
            task.cancel()
        watching.cancel()
        await probe.close()
    return Run(started, writing_stopped, ended, writers, readers, faults, producers)


async def drain(activity: Activity) -> None:
    """Wait until no reader has received anything for DRAIN_QUIET seconds (at most DRAIN_MAX)."""
    deadline = time.monotonic() + DRAIN_MAX
    while time.monotonic() < deadline:
        idle = time.time() - activity.last
        if idle >= DRAIN_QUIET:
            return
        await asyncio.sleep(DRAIN_QUIET - idle)


async def soak(options: Options, cluster: ThrowawayPostgres, stamp: str) -> int:
    """Start the gateway, run, stop it, and print the summary; return the exit status."""
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    log_path = RAW / f"soak-{stamp}.log"
    gateway = await GatewayProcess.start(
        cluster.uri, log_path, options.pool_size, durable=options.durable
    )
    try:
        run = await drive(options, cluster, gateway)
    except BaseExceptionGroup as group:  # the TaskGroup wraps what went wrong
        raise first_error(group) from None
    finally:
        code = await gateway.stop()
    report = analyse(run, options.guard)
    if options.durable:
        offsets = await stored_offsets(cluster.uri)
        report.stored = len(offsets)
        report.order_errors = order_errors(run.readers, offsets)
    events = read_log(log_path)
    print(render(options, run, report, events, log_path, exit_code=code))
    write_json(RAW / f"soak-{stamp}.json", options, run, report)
    return 0 if passed(options, run, report) else 1


def passed(options: Options, run: Run, report: Report) -> bool:
    """No loss outside windows and every fault recovered; durable mode: no loss at all, no
    duplicate, no order error."""
    if any(fault.end is None for fault in run.faults) or report.lost["outside"]:
        return False
    if options.durable:
        return not (sum(report.lost.values()) or report.duplicates or report.order_errors)
    return True


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to report from a TaskGroup's group: ours first, a timed-out wait as ours."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        error = pending.pop(0)
        if isinstance(error, BaseExceptionGroup):
            pending.extend(error.exceptions)
        else:
            leaves.append(error)
    for error in leaves:
        if isinstance(error, SoakError):
            return error
    if isinstance(leaves[0], TimeoutError):
        return SoakError("a bounded wait timed out (the gateway stopped answering?)")
    return leaves[0]


# --- accounting ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Report:
    """The figures of one run."""

    sent: int
    refused: Counter[str]  # by where: "window", "guard", "outside"
    lost: Counter[str]
    delivered_any: int
    per_reader: list[int]
    duplicates: int
    malformed: int
    latencies: list[float]  # seconds, every delivery of a message sent outside windows and bands
    lost_outside: list[dict[str, Any]]  # the first few, for the investigation
    slow: Counter[int]  # messages outside windows slower than SLOW to some reader, by second sent
    server_closes: Counter[str]  # "code reason" of writer sockets the server ended
    reader_drops: int
    producer_failures: Counter[str] = dataclasses.field(default_factory=Counter)
    stored: int = 0  # durable mode: messages of the soak channel in pgws.message at the end
    order_errors: int = 0  # durable mode: arrivals below an offset the reader already had

    @property
    def refused_total(self) -> int:
        """Every refused message."""
        return sum(self.refused.values())


def where(sent_at: float, windows: Sequence[tuple[float, float]], guard: float) -> str:
    """Where a send time falls: "window", "guard" (within `guard` of a window) or "outside"."""
    if any(start <= sent_at <= end for start, end in windows):
        return "window"
    if any(start - guard <= sent_at <= end + guard for start, end in windows):
        return "guard"
    return "outside"


def refused_keys(writers: Sequence[Writer], delivered: set[Key]) -> set[Key]:
    """Frames sent on a server-closed socket after the last one a reader received from it."""
    refused: set[Key] = set()
    for writer in writers:
        for session in writer.sessions:
            if not session.by_server:
                continue
            last = max(
                (i for i, seq in enumerate(session.seqs) if (writer.ident, seq) in delivered),
                default=-1,
            )
            refused.update((writer.ident, seq) for seq in session.seqs[last + 1 :])
    return refused


def analyse(run: Run, guard: float) -> Report:
    """Classify every message sent: refused or accepted, delivered or lost, and where in time."""
    windows = [
        (fault.start, fault.end if fault.end is not None else math.inf)
        for fault in run.faults
        if fault.outage
    ]
    delivered = {key for reader in run.readers for key in reader.received}
    sources = [*run.writers, *run.producers]
    refused = refused_keys(sources, delivered)
    report = Report(
        sent=sum(len(writer.sent) for writer in sources),
        refused=Counter(),
        lost=Counter(),
        delivered_any=0,
        per_reader=[len(reader.received) for reader in run.readers],
        duplicates=sum(reader.duplicates for reader in run.readers),
        malformed=sum(reader.malformed for reader in run.readers),
        latencies=[],
        lost_outside=[],
        slow=Counter(),
        server_closes=Counter(
            f"{session.code} {session.reason}".strip()
            for writer in run.writers
            for session in writer.sessions
            if session.by_server
        ),
        reader_drops=sum(len(reader.drops) for reader in run.readers),
        producer_failures=Counter(
            session.reason.split(":")[0]
            for producer in run.producers
            for session in producer.sessions
            if session.by_server
        ),
    )
    for writer in sources:
        for seq, sent_at in writer.sent.items():
            key = (writer.ident, seq)
            place = where(sent_at, windows, guard)
            report.delivered_any += key in delivered
            if key in refused:
                report.refused[place] += 1
                continue
            missed = [r.ident for r in run.readers if r.covers(sent_at) and key not in r.received]
            if missed:
                report.lost[place] += 1
                if place == "outside" and len(report.lost_outside) < LOST_EXAMPLES:
                    report.lost_outside.append(
                        lost_example(key, sent_at, missed, run, writer.sessions)
                    )
            if place == "outside":
                latencies = [r.received[key] - sent_at for r in run.readers if key in r.received]
                report.latencies.extend(latencies)
                if max(latencies, default=0.0) > SLOW:
                    report.slow[int(sent_at - run.started)] += 1
    return report


def lost_example(
    key: Key, sent_at: float, missed: list[int], run: Run, sessions: Sequence[Session]
) -> dict[str, Any]:
    """What an investigation needs about one lost message: when, who missed it, nearby faults."""
    session = next((s for s in sessions if key[1] in s.seqs), None)
    nearest = min(run.faults, key=lambda fault: abs(fault.start - sent_at), default=None)
    return {
        "writer": key[0],
        "seq": key[1],
        "sent_at": round(sent_at - run.started, 3),
        "missed_by": missed,
        "session_closed": None
        if session is None or session.closed is None
        else round(session.closed - run.started, 3),
        "session_close": None
        if session is None or not session.by_server
        else f"{session.code} {session.reason}".strip(),
        "nearest_fault": None
        if nearest is None
        else {"kind": nearest.kind, "start": round(nearest.start - run.started, 3)},
    }


def percentile(values: Sequence[float], fraction: float) -> float:
    """The value below which `fraction` of `values` lie (nearest rank); NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


def ms(seconds: float) -> str:
    """Seconds as milliseconds for the summary."""
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.1f} ms"


def render(
    options: Options,
    run: Run,
    report: Report,
    events: Sequence[dict[str, Any]],
    log_path: Path,
    exit_code: int | None,
) -> str:
    """The summary printed at the end."""
    t0 = run.started
    lines = [
        f"pgws soak: {options.duration:g} s, {options.readers} readers, {options.writers} writers"
        f" x {options.rate:g} msg/s, a fault every {options.fault_interval:g} s"
        f" ({', '.join(options.faults) or 'none'})",
        *(
            [
                f"durable mode: PGWS_DURABLE=true, synchronous_commit=on; {options.producers}"
                f" SQL producers x {options.producer_rate:g} msg/s (pgws.send, writer ids from"
                f" {PRODUCER_IDENT})"
            ]
            if options.durable
            else []
        ),
        f"gateway log: {log_path.relative_to(REPO)} (exit status {exit_code} after SIGTERM)",
        f"writing: +0.00 .. +{run.writing_stopped - t0:.2f} s; drained until"
        f" +{run.ended - t0:.2f} s",
        "",
        "faults (time from the start of writing; window = injection until /ready 200 and a probe"
        " round trip):",
    ]
    window_total = 0.0
    for fault in run.faults:
        if fault.end is None:
            length = "NOT RECOVERED"
        else:
            length = f"{fault.end - fault.start:7.3f} s"
            if fault.outage:
                window_total += fault.end - fault.start
        note = "" if fault.outage else "  (listener untouched: not an outage window)"
        lines.append(
            f"  +{fault.start - t0:6.2f} s  {fault.kind:<9}  {length}  {fault.detail}{note}"
        )
    if not run.faults:
        lines.append("  none")
    lines.append(
        f"  outage windows: {window_total:.3f} s in all; guard band {options.guard:g} s on"
        " each side"
    )
    accepted = report.sent - report.refused_total
    p50, p99 = percentile(report.latencies, 0.5), percentile(report.latencies, 0.99)
    top = max(report.latencies, default=math.nan)
    lost_outside = report.lost["outside"]
    must = "   (durable: must be 0)" if options.durable else ""
    lines += [
        "",
        "messages",
        f"  sent                          {report.sent:>8}",
        f"  refused (socket closed)       {report.refused_total:>8}   in windows"
        f" {report.refused['window']}, in guard bands {report.refused['guard']}, outside"
        f" {report.refused['outside']}",
        f"  accepted                      {accepted:>8}",
        f"  delivered (to any reader)     {report.delivered_any:>8}   per reader min"
        f" {min(report.per_reader, default=0)}, max {max(report.per_reader, default=0)}",
        f"  lost inside windows           {report.lost['window']:>8}{must}",
        f"  lost in guard bands           {report.lost['guard']:>8}{must}",
        f"  lost outside windows          {lost_outside:>8}   (must be 0)",
        f"  duplicates                    {report.duplicates:>8}{must}",
    ]
    if options.durable:
        lines.append(
            f"  order errors (per channel)    {report.order_errors:>8}{must}, against the"
            f" {report.stored} stored offsets"
        )
    lines += [
        f"  latency outside windows       p50 {ms(p50)}, p99 {ms(p99)}, max {ms(top)}"
        f" ({len(report.latencies)} deliveries)",
    ]
    if report.slow:
        seconds = ", ".join(f"+{second} s: {n}" for second, n in sorted(report.slow.items()))
        lines.append(f"  slower than {ms(SLOW)} (messages by second sent): {seconds}")
    if report.malformed:
        lines.append(f"  malformed notifications       {report.malformed:>8}")
    closes = ", ".join(f"{count} x {what!r}" for what, count in report.server_closes.most_common())
    lines += [
        "",
        f"writer sockets closed by the server: {sum(report.server_closes.values())}"
        + (f" ({closes})" if closes else ""),
        f"writer connection failures: {sum(w.connect_failures for w in run.writers)};"
        f" reader drops: {report.reader_drops}",
        *(
            [
                "SQL producer calls failed: "
                + (
                    ", ".join(f"{n} x {what}" for what, n in report.producer_failures.items())
                    or "0"
                )
                + f"; connection failures {sum(p.connect_failures for p in run.producers)}"
            ]
            if options.durable
            else []
        ),
        "gateway log: " + gateway_events(events, t0),
    ]
    if report.refused["outside"]:
        lines.append(
            f"WARNING: {report.refused['outside']} messages refused outside outage windows"
        )
    for example in report.lost_outside:
        lines.append(f"  lost: {json.dumps(example)}")
    verdict = "PASS" if passed(options, run, report) else "FAIL"
    lines += ["", f"result: {verdict}"]
    return "\n".join(lines)


def gateway_events(events: Sequence[dict[str, Any]], t0: float) -> str:
    """Counts of the lifecycle events that matter here, and the listener's timeline."""
    names = (
        "listener_lost",
        "listener_connected",
        "listener_reconnect_failed",
        "notify_failed",
        "client_lagging",
        "handler_crashed",
    )
    counts = Counter(str(event.get("event")) for event in events)
    errors = sum(1 for event in events if event.get("level") in ("error", "critical"))
    parts = [f"{name} {counts[name]}" for name in names]
    timeline = []
    for event in events:
        stamp = log_time(event)
        if event.get("event") in ("listener_lost", "listener_connected") and stamp is not None:
            label = "lost" if event["event"] == "listener_lost" else "up"
            timeline.append(f"{label} {stamp - t0:+.2f}")
    return ", ".join([*parts, f"error lines {errors}"]) + (
        "\n  listener: " + ", ".join(timeline) if timeline else ""
    )


def write_json(target: Path, options: Options, run: Run, report: Report) -> None:
    """Keep the figures beside the gateway log (bench/results/raw is not committed)."""
    t0 = run.started
    record = {
        "options": {**dataclasses.asdict(options), "faults": list(options.faults)},
        "faults": [
            {
                "kind": f.kind,
                "start": round(f.start - t0, 3),
                "end": None if f.end is None else round(f.end - t0, 3),
                "outage": f.outage,
                "detail": f.detail,
            }
            for f in run.faults
        ],
        "sent": report.sent,
        "refused": dict(report.refused),
        "lost": dict(report.lost),
        "delivered_any": report.delivered_any,
        "per_reader": report.per_reader,
        "duplicates": report.duplicates,
        "order_errors": report.order_errors,
        "stored": report.stored,
        "producer_failures": dict(report.producer_failures),
        "latency_p50": percentile(report.latencies, 0.5),
        "latency_p99": percentile(report.latencies, 0.99),
        "slow_by_second": dict(report.slow),
        "server_closes": dict(report.server_closes),
        "lost_outside": report.lost_outside,
        "writer_sessions": [
            [
                {
                    "opened": round(s.opened - t0, 3),
                    "closed": None if s.closed is None else round(s.closed - t0, 3),
                    "frames": len(s.seqs),
                    "code": s.code,
                    "reason": s.reason,
                }
                for s in writer.sessions
            ]
            for writer in run.writers
        ],
    }
    target.write_text(json.dumps(record, indent=1) + "\n")


# --- command line --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> Options:
    """Options from the command line (--quick changes the defaults, not explicit values)."""
    parser = argparse.ArgumentParser(
        prog="bench/soak.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--duration", type=float, help="seconds of writing (default 60; quick 20)")
    parser.add_argument("--readers", type=int, default=20, help="reader sockets (default 20)")
    parser.add_argument("--writers", type=int, default=5, help="writer sockets (default 5)")
    parser.add_argument("--rate", type=float, default=50.0, help="msg/s per writer (default 50)")
    parser.add_argument(
        "--fault-interval", type=float, help="seconds between faults (default 10; quick 4)"
    )
    parser.add_argument(
        "--faults",
        default=",".join(FAULT_KINDS),
        help="fault kinds to cycle through, comma-separated, or 'none' (default: all, in order)",
    )
    parser.add_argument(
        "--guard",
        type=float,
        default=0.5,
        help="seconds around each outage window reported apart (default 0.5)",
    )
    parser.add_argument(
        "--pool-size", type=int, default=10, help="PGWS_POOL_SIZE of the gateway (default 10)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="20 s with a fault every 4 s (each kind once)"
    )
    parser.add_argument(
        "--durable",
        action="store_true",
        help="PGWS_DURABLE=true, synchronous_commit=on, plus SQL producers; nothing may be lost,"
        " inside outage windows too",
    )
    parser.add_argument(
        "--producers", type=int, default=2, help="SQL producers in durable mode (default 2)"
    )
    parser.add_argument(
        "--producer-rate", type=float, default=50.0, help="msg/s per SQL producer (default 50)"
    )
    args = parser.parse_args(argv)
    faults = () if args.faults == "none" else tuple(k.strip() for k in args.faults.split(","))
    if unknown := [kind for kind in faults if kind not in FAULT_KINDS]:
        parser.error(f"--faults: unknown kind {unknown[0]!r}")
    options = Options(
        duration=args.duration if args.duration is not None else (20.0 if args.quick else 60.0),
        readers=args.readers,
        writers=args.writers,
        rate=args.rate,
        fault_interval=args.fault_interval
        if args.fault_interval is not None
        else (4.0 if args.quick else 10.0),
        faults=faults,
        guard=args.guard,
        pool_size=args.pool_size,
        durable=args.durable,
        producers=args.producers if args.durable else 0,
        producer_rate=args.producer_rate,
    )
    if min(options.duration, options.rate, options.fault_interval) <= 0 or options.guard < 0:
        parser.error("durations, rate and interval must be positive, the guard not negative")
    if options.durable and (options.producers < 0 or options.producer_rate <= 0):
        parser.error("--producers must not be negative, --producer-rate must be positive")
    if min(options.readers, options.writers, options.pool_size) < 1:
        parser.error("--readers, --writers and --pool-size must be at least 1")
    return options


def main(argv: Sequence[str] | None = None) -> int:
    """Run the soak test; return the exit status."""
    options = parse_args(argv)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    cluster: ThrowawayPostgres | None = None
    try:
        # Durable mode promises what was committed survives an immediate restart: the cluster
        # must not acknowledge commits before their WAL is written (devdb turns that off).
        settings = {**DEFAULT_SETTINGS, "synchronous_commit": "on"} if options.durable else None
        cluster = ThrowawayPostgres(settings=settings)
        cluster.start()
        return asyncio.run(soak(options, cluster, stamp))
    except KeyboardInterrupt:
        print("interrupted; everything started here was stopped", file=sys.stderr)
        return 130
    except asyncio.CancelledError:  # SIGTERM
        print("terminated; everything started here was stopped", file=sys.stderr)
        return 143
    except SoakError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 1
    except (RuntimeError, OSError, psycopg.Error) as exc:
        print(f"soak: could not run: {exc}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not strand postgres
        if cluster is not None:
            cluster.cleanup()


if __name__ == "__main__":
    sys.exit(main())
