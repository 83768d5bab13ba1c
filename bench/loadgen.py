"""Load generator: thousands of WebSocket clients in one process, cheap enough not to be the limit.

The client is a hand-written asyncio protocol: it sends the opening handshake, then only finds
frame boundaries in what arrives (it counts messages and, for latency, reads the send time that
the writer put in the payload). Client frames use a zero mask, so writing costs one syscall.

Each subcommand prints JSON lines on stdout: `measure_start` / `measure_end` around the
measured window (the runner samples the server's CPU between them), `checkpoint` (connections:
the runner measures memory) and one final `result`. With `--sync` it waits after `measure_end`
and `checkpoint` until the runner has answered every marker with a line on stdin.

    python -m bench.loadgen fanout --port 3000 --secret s --db-uri URI --readers 1000
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import json
import math
import resource
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

from bench import pgraw, sqlsend
from bench.pgraw import NotifyCounter, PipelinedNotifier
from bench.wire import (
    client_frame,
    handshake_request,
    handshake_status,
    make_token,
    raise_nofile_limit,
)

_LINGER_RESET = struct.pack("ii", 1, 0)
_PROBE_TRIES = 40


def emit(event: str, **fields: Any) -> None:
    """Print one JSON line for the runner."""
    print(json.dumps({"event": event, **fields}), flush=True)


def cpu_seconds() -> float:
    """CPU time (user + system) this process has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Tally:
    """A counter that a coroutine can wait on without polling."""

    __slots__ = ("_waiter", "_wake_at", "value")

    def __init__(self) -> None:
        self.value = 0
        self._wake_at = math.inf
        self._waiter: asyncio.Future[None] | None = None

    def add(self, amount: int) -> None:
        """Add `amount`, waking a waiter whose target is reached."""
        self.value += amount
        if self.value >= self._wake_at:
            self._wake()

    def set(self, value: int) -> None:
        """Set the value (for counts kept elsewhere), waking a waiter whose target is reached."""
        self.value = value
        if value >= self._wake_at:
            self._wake()

    def _wake(self) -> None:
        self._wake_at = math.inf
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait_for(self, target: float, within: float) -> bool:
        """Wait until the value reaches `target`; False on timeout."""
        if self.value >= target:
            return True
        self._waiter = asyncio.get_running_loop().create_future()
        self._wake_at = target
        try:
            async with asyncio.timeout(within):
                await self._waiter
        except TimeoutError:
            return False
        finally:
            self._waiter = None
            self._wake_at = math.inf
        return True

    async def wait_progress(self, target: float, idle: float) -> bool:
        """Wait until the value reaches `target`; False only once it stops moving for `idle` s."""
        while True:
            before = self.value
            if await self.wait_for(target, within=idle):
                return True
            if self.value == before:
                return False

    async def wait_quiet(self, quiet: float, within: float, target: float = math.inf) -> None:
        """Wait until the value reaches `target` or stops changing for `quiet` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while self.value < target and loop.time() < deadline:
            before = self.value
            await self.wait_for(min(target, before + 1), min(quiet, deadline - loop.time()))
            if self.value == before:
                return


class Client(asyncio.Protocol):
    """One WebSocket client: handshake, then frame counting (and, optionally, latency samples).

    Messages are counted per client and in the shared `tally`. For latency, `samples` gets
    receipt time minus the send time (ns) found in the payload, for sends in [`since`, `until`).
    """

    def __init__(
        self, request: bytes, accept: bytes, tally: Tally, hello: Sequence[bytes] = ()
    ) -> None:
        self.request = request
        self.accept = accept
        self.tally = tally
        # pgws.v2: the request frames sent after the 101 (auth, sub); the socket counts as open
        # once each got its `ok`, and those replies are not counted as messages.
        self.hello = b"".join(client_frame(frame) for frame in hello)
        self.pending_oks = len(hello)
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.is_open = False
        self.closing = False
        self.closed_by_server = False
        self.messages = 0
        self.buffer = b""
        self.samples: array.array[int] | None = None
        self.since = 0
        self.until = 0
        self.unparsed = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send the opening handshake."""
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        """Record who ended the connection."""
        if not self.opened.done():
            self.opened.set_result(0)
        if self.is_open and not self.closing:
            self.closed_by_server = True
        self.is_open = False

    def data_received(self, data: bytes) -> None:
        """Finish the handshake, then hand everything to the frame parser."""
        if self.is_open:
            self.on_frames(data)
            return
        head = self.buffer + data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            self.buffer = head
            if len(head) > 65536:
                self._fail(0)
            return
        self.buffer = b""
        status = handshake_status(head[: end + 2], self.accept)
        if status != 101:
            self._fail(status)
            return
        self.is_open = True
        if self.hello:
            cast(asyncio.Transport, self.transport).write(self.hello)
        else:
            self.opened.set_result(101)
        if len(head) > end + 4:
            self.on_frames(head[end + 4 :])

    def _fail(self, status: int) -> None:
        if not self.opened.done():
            self.opened.set_result(status)
        if self.transport is not None:
            self.transport.close()

    def on_frames(self, data: bytes) -> None:
        """Find frame boundaries; count final data frames, answer pings and closes."""
        if self.buffer:
            data = self.buffer + data
            self.buffer = b""
        samples = self.samples
        now = time.perf_counter_ns() if samples is not None else 0
        size = len(data)
        pos = 0
        messages = 0
        while size - pos >= 2:
            second = data[pos + 1]
            length = second & 0x7F
            start = pos + 2
            if length == 126:
                if size - pos < 4:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                start = pos + 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                start = pos + 10
            if second & 0x80:
                start += 4  # servers never mask; skip the key rather than choke
            end = start + length
            if end > size:
                break
            first = data[pos]
            opcode = first & 0x0F
            if opcode < 3:
                if self.pending_oks and self._reply(data, start):
                    pass
                elif first & 0x80:
                    messages += 1
                    if samples is not None:
                        self._sample(data, start, end, now, samples)
            else:
                self._control(opcode, data[start:end])
            pos = end
        if pos < size:
            self.buffer = data[pos:]
        if messages:
            self.messages += messages
            self.tally.add(messages)

    def _reply(self, data: bytes, start: int) -> bool:
        """A pgws.v2 reply to the hello frames: `ok` counts down to open, `err` fails."""
        if data.startswith(b'{"op":"ok"', start):
            self.pending_oks -= 1
            if not self.pending_oks and not self.opened.done():
                self.opened.set_result(101)
            return True
        if data.startswith(b'{"op":"err"', start):
            self._fail(0)
            return True
        return False

    def _sample(
        self, data: bytes, start: int, end: int, now: int, samples: array.array[int]
    ) -> None:
        key = data.find(b'"payload":"', start, end)  # compact JSON, as orjson writes it
        if key >= 0:
            pos = key + 11
        else:  # tolerate spaces around the colon
            key = data.find(b'"payload"', start, end)
            if key < 0:
                self.unparsed += 1
                return
            pos = key + 9
            while pos < end and data[pos] in b' :"':
                pos += 1
        try:
            sent = int(data[pos : data.find(b" ", pos, end)])
        except ValueError:
            self.unparsed += 1
            return
        if self.since <= sent < self.until:
            samples.append(now - sent)

    def _control(self, opcode: int, payload: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if opcode == 0x9:
            transport.write(client_frame(payload, 0xA))
        elif opcode == 0x8:
            if not self.closing:
                self.closed_by_server = True
            self.closing = True
            transport.write(client_frame(payload[:2], 0x8))

    def send_text(self, payload: bytes) -> None:
        """Send one text frame (no-op once the connection is gone)."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(client_frame(payload))

    def reset(self) -> None:
        """Drop the connection at once: RST, so no TIME_WAIT piles up on either side."""
        self.closing = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        transport.abort()


class Pool:
    """Opens and holds clients against one server."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.host: str = args.host
        self.port: int = args.port
        self.secret: str = args.secret
        self.channel: str = args.channel
        self.path_form: str = args.path_form
        self.concurrency: int = args.connect_concurrency
        self.protocol: str = getattr(args, "protocol", "legacy")
        self.timeout: float = args.connect_timeout
        self.clients: list[Client] = []
        self.failures: dict[int, int] = {}
        self.issued = 0  # tokens made so far

    def path(self, mode: str) -> str:
        """The URL path for a socket of `mode` on the benchmark channel.

        Every socket gets a token of its own (a `jti` counter), as real clients do, so no cache
        of verified tokens could make handshakes look cheaper than they are.
        """
        self.issued += 1
        claims = {"mode": mode, "channels": [self.channel], "jti": str(self.issued)}
        token = make_token(self.secret, claims)
        return f"/{self.channel}/{token}" if self.path_form == "channel" else f"/{token}"

    def v2_hello(self, mode: str) -> list[bytes]:
        """pgws.v2 (SPEC 8): `auth` with a token of its own (as in `path`), then `sub`."""
        self.issued += 1
        claims = {"mode": mode, "channels": [self.channel], "jti": str(self.issued)}
        auth = {"op": "auth", "token": make_token(self.secret, claims), "ref": 1}
        sub = {"op": "sub", "ch": self.channel, "ref": 2}
        return [json.dumps(auth).encode(), json.dumps(sub).encode()]

    async def open(self, count: int, mode: str, tally: Tally) -> tuple[list[Client], float]:
        """Open `count` sockets, `concurrency` handshakes at a time; return them and the time taken.

        Failed handshakes are counted in `failures` by HTTP status (0: no usable answer).
        """
        loop = asyncio.get_running_loop()
        opened: list[Client] = []
        remaining = count

        async def one() -> None:
            if self.protocol == "v2":
                request, accept = handshake_request(self.host, self.port, "/", "pgws.v2")
                client = Client(request, accept, tally, self.v2_hello(mode))
            else:
                request, accept = handshake_request(self.host, self.port, self.path(mode))
                client = Client(request, accept, tally)
            try:
                async with asyncio.timeout(self.timeout):
                    await loop.create_connection(lambda: client, self.host, self.port)
                    status = await client.opened
            except (OSError, TimeoutError):
                status = 0
            if status == 101:
                opened.append(client)
            else:
                self.failures[status] = self.failures.get(status, 0) + 1
                client.reset()

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await one()

        started = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            for _ in range(min(self.concurrency, count)):
                group.create_task(worker())
        self.clients.extend(opened)
        return opened, time.perf_counter() - started

    def failed(self) -> int:
        """How many handshakes failed so far."""
        return sum(self.failures.values())

    def closed_by_server(self) -> int:
        """How many open sockets the server closed or dropped."""
        return sum(client.closed_by_server for client in self.clients)

    def reset_all(self) -> None:
        """Drop every client."""
        for client in self.clients:
            client.reset()
        self.clients.clear()


class Control:
    """The runner's side channel: it answers every marker we print with one line on stdin.

    Waiting for the answer to `measure_end` keeps every connection (and so every PostgreSQL
    backend) alive until the runner has sampled CPU; at a checkpoint it is the runner's go-ahead.
    Without `--sync` (by hand) nothing is awaited.
    """

    def __init__(self) -> None:
        self.enabled = False
        self.marked = 0
        self.answers = Tally()
        self._reader: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Start reading stdin."""
        self.enabled = True
        stdin = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

        async def read_forever() -> None:
            while await stdin.readline():
                self.answers.add(1)

        self._reader = asyncio.create_task(read_forever(), name="control")

    def mark(self, event: str, **fields: Any) -> None:
        """Print a marker the runner will answer."""
        emit(event, **fields)
        self.marked += 1

    async def answered(self, within: float) -> None:
        """Wait until every marker so far has been answered (or `within` seconds)."""
        if self.enabled and not await self.answers.wait_for(self.marked, within=within):
            raise TimeoutError(f"the runner did not answer within {within:.0f} s")


CONTROL = Control()


class Window:
    """The measured interval: wall time, this process's CPU, and the runner's markers."""

    def __init__(self) -> None:
        self.started = 0.0
        self.seconds = 0.0
        self.cpu_pct = 0.0
        self._cpu = 0.0

    def start(self) -> None:
        """Open the window and tell the runner (without waiting: the load must go on)."""
        CONTROL.mark("measure_start")
        self.started = time.perf_counter()
        self._cpu = cpu_seconds()

    async def stop(self) -> None:
        """Close the window, tell the runner and wait until it has sampled."""
        self.seconds = time.perf_counter() - self.started
        self.cpu_pct = 100 * (cpu_seconds() - self._cpu) / self.seconds
        CONTROL.mark("measure_end")
        await CONTROL.answered(within=10)


def padding(size: int) -> bytes:
    """Filler that needs no JSON escaping."""
    return b"x" * max(0, size)


async def probe_until(send: Callable[[], None], tally: Tally, target: int, what: str) -> None:
    """Send probes until `tally` reaches `target` (the path is ready), then let stragglers land."""
    for _ in range(_PROBE_TRIES):
        send()
        if await tally.wait_for(target, within=0.5):
            await tally.wait_quiet(quiet=0.2, within=3)
            return
    raise RuntimeError(f"{what}: nothing came through after {_PROBE_TRIES} probes")


# --- scenarios -------------------------------------------------------------------------------


async def fanout(args: argparse.Namespace) -> dict[str, Any]:
    """One NOTIFY stream to N readers, as fast as the readers keep up (closed loop).

    The producer keeps at most `window` messages not yet received by every reader, so queues stay
    bounded and what is measured is the rate the server sustains, not how much it can buffer.
    """
    pool, tally = Pool(args), Tally()
    readers, _ = await pool.open(args.readers, "r", tally)
    if len(readers) < args.readers:
        raise RuntimeError(f"only {len(readers)} of {args.readers} readers opened: {pool.failures}")
    count = len(readers)
    window = max(2, args.window_frames // count)
    if args.producer == "send":  # durable channels: pgws.send stores each message (SPEC 7)
        notifier = await PipelinedNotifier.open(args.db_uri, b"SELECT pgws.send($1, $2)")
        listen = args.channel.encode()
    else:
        notifier = await PipelinedNotifier.open(args.db_uri)
        listen = args.listen_channel.encode()
    body = (
        b'{"event":"WebsocketMessage","channel":"%s","payload":"%%d %s",'
        b'"claims":{"mode":"w","channels":["%s"],"message_delivered_at":%%.6f}}'
        % (args.channel.encode(), padding(args.payload_size), args.channel.encode())
    )
    sent = 0

    def send_one() -> None:
        nonlocal sent
        notifier.send(listen, body % (sent, time.time()))
        sent += 1

    def send_batch() -> None:
        """--per-transaction NOTIFYs in one transaction: they reach the server in one read."""
        nonlocal sent
        now = time.time()
        notifier.send_many(listen, [body % (sent + i, now) for i in range(args.per_transaction)])
        sent += args.per_transaction

    await probe_until(send_one, tally, count, "fan-out")
    sent0, frames0 = sent, tally.value
    stalls, credit, running = 0, 0, True

    async def produce() -> None:
        nonlocal stalls, credit
        while running:
            outstanding = sent - sent0 - (tally.value - frames0 + credit) // count
            while outstanding < window:
                if args.per_transaction == 1:
                    send_one()
                else:
                    send_batch()
                outstanding += args.per_transaction
            target = (sent - sent0 - window // 2) * count + frames0 - credit
            if not await tally.wait_progress(target, idle=args.stall_timeout) and running:
                stalls += 1
                credit = (sent - sent0) * count - (tally.value - frames0)

    measured = Window()
    async with asyncio.TaskGroup() as group:
        producer = group.create_task(produce())
        await asyncio.sleep(args.warmup)
        before = [client.messages for client in readers]
        frames_start = tally.value
        measured.start()
        await asyncio.sleep(args.duration)
        frames_end = tally.value
        await measured.stop()
        after = [client.messages for client in readers]
        running = False
        producer.cancel()
    expected = (sent - sent0) * count
    await tally.wait_quiet(quiet=1.0, within=args.drain_timeout, target=frames0 + expected)
    received = tally.value - frames0
    per_reader = [b - a for a, b in zip(before, after, strict=True)]
    await notifier.close()
    result = {
        "delivered_per_s": (frames_end - frames_start) / measured.seconds,
        "notifies_per_s": (frames_end - frames_start) / measured.seconds / count,
        "loss_frac": max(0, expected - received) / expected if expected else 0.0,
        "lost": expected - received,
        "expected": expected,
        "stalls": stalls,
        "reader_min_share": min(per_reader) * count / max(1, sum(per_reader)),
        "closed_by_server": pool.closed_by_server(),
        "window_msgs": window,
        "per_transaction": args.per_transaction,
        "readers": count,
        "seconds": measured.seconds,
        "loadgen_cpu_pct": measured.cpu_pct,
        "notify_errors": notifier.errors,
    }
    if args.protocol == "v2":
        result["frame_overhead_bytes"] = v2_frame_overhead(args.channel, body % (0, time.time()))
    pool.reset_all()
    return result


def v2_frame_overhead(channel: str, notification: bytes) -> int:
    """Bytes a pgws.v2 `msg` frame (SPEC 8) takes beyond the legacy frame of the same JSON
    notification: `{"op":"msg","ch":<channel>,"data":` + the notification + `}`, header included."""
    msg = b'{"op":"msg","ch":%s,"data":%s}' % (json.dumps(channel).encode(), notification)
    return frame_size(len(msg)) - frame_size(len(notification))


def frame_size(payload: int) -> int:
    """An unmasked server frame's size for a payload of `payload` bytes (RFC 6455 5.2)."""
    return payload + (2 if payload < 126 else 4 if payload < 1 << 16 else 10)


async def _closed_loop(
    args: argparse.Namespace,
    send: Callable[[int], None],
    seen: Tally,
    window: int,
) -> dict[str, Any]:
    """Drive `send(seq)` so that at most `window` sends are not yet seen; measure the seen rate."""
    sent, stalls, credit, running = 0, 0, 0, True

    seen0 = seen.value

    async def drive() -> None:
        nonlocal sent, stalls, credit
        while running:
            for _ in range(window - (sent - (seen.value - seen0) - credit)):
                send(sent)
                sent += 1
            target = seen0 + sent - credit - window // 2
            if not await seen.wait_progress(target, idle=args.stall_timeout) and running:
                stalls += 1
                credit = sent - (seen.value - seen0)

    measured = Window()
    async with asyncio.TaskGroup() as group:
        driver = group.create_task(drive())
        await asyncio.sleep(args.warmup)
        start = seen.value
        measured.start()
        await asyncio.sleep(args.duration)
        end = seen.value
        await measured.stop()
        running = False
        driver.cancel()
    await seen.wait_quiet(quiet=1.0, within=args.drain_timeout, target=seen0 + sent)
    received = seen.value - seen0
    return {
        "seen_per_s": (end - start) / measured.seconds,
        "loss_frac": max(0, sent - received) / sent if sent else 0.0,
        "lost": sent - received,
        "sent": sent,
        "stalls": stalls,
        "seconds": measured.seconds,
        "loadgen_cpu_pct": measured.cpu_pct,
    }


async def ingest(args: argparse.Namespace) -> dict[str, Any]:
    """M writer sockets send frames; a separate LISTEN connection counts the NOTIFYs."""
    pool, unused = Pool(args), Tally()
    writers, _ = await pool.open(args.writers, "w", unused)
    if len(writers) < args.writers:
        raise RuntimeError(f"only {len(writers)} of {args.writers} writers opened: {pool.failures}")
    seen = Tally()
    counter: NotifyCounter | StoredCounter
    if args.count == "stored":  # durable channels: rows committed, not NOTIFYs (SPEC 7)
        counter = await StoredCounter.open(args.db_uri, args.channel, seen)
    else:
        counter = await NotifyCounter.open(args.db_uri, args.listen_channel)
        counter.on_count = seen.set
    pad = padding(args.payload_size)
    await probe_until(lambda: writers[0].send_text(b"probe " + pad), seen, 1, "ingest")

    def send(seq: int) -> None:
        writers[seq % len(writers)].send_text(b"%d %s" % (seq, pad))

    result = await _closed_loop(args, send, seen, args.window_per_writer * len(writers))
    result |= {"writers": len(writers), "closed_by_server": pool.closed_by_server()}
    await counter.close()
    pool.reset_all()
    return result


class StoredCounter:
    """Count messages stored on a durable channel: its `top` in pgws.channel, polled.

    Wake-ups fold (one per channel per batch), so durable ingest cannot be counted by LISTEN.
    """

    POLL = 0.005  # seconds between reads of the channel's top

    def __init__(self, conn: Any, channel: str, tally: Tally, start: int) -> None:
        self._conn, self._channel, self._tally, self._start = conn, channel, tally, start
        self._task = asyncio.create_task(self._poll_forever(), name="stored-counter")

    @classmethod
    async def open(cls, uri: str, channel: str, tally: Tally) -> StoredCounter:
        conn = await pgraw.connect(uri)
        return cls(conn, channel, tally, await cls._top(conn, channel))

    @staticmethod
    async def _top(conn: Any, channel: str) -> int:
        cur = await conn.execute(
            "SELECT coalesce((SELECT top FROM pgws.channel WHERE name = %s), 0)", (channel,)
        )
        row = await cur.fetchone()
        return int(row[0])

    async def _poll_forever(self) -> None:
        while True:
            self._tally.set(await self._top(self._conn, self._channel) - self._start)
            await asyncio.sleep(self.POLL)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._conn.close()


async def notify(args: argparse.Namespace) -> dict[str, Any]:
    """No gateway: C pipelined connections NOTIFY directly, a LISTEN connection counts."""
    counter = await NotifyCounter.open(args.db_uri, args.listen_channel)
    seen = Tally()
    counter.on_count = seen.set
    notifiers = [await PipelinedNotifier.open(args.db_uri) for _ in range(args.connections)]
    listen = args.listen_channel.encode()
    body = b'{"event":"WebsocketMessage","channel":"%s","payload":"%%d %s"}' % (
        args.channel.encode(),
        padding(args.payload_size + 110),  # as long as an envelope with its claims
    )
    await probe_until(lambda: notifiers[0].send(listen, body % -1), seen, 1, "notify")

    def send(seq: int) -> None:
        notifiers[seq % len(notifiers)].send(listen, body % seq)

    window = args.window_per_connection * len(notifiers)
    result = await _closed_loop(args, send, seen, window)
    result |= {
        "connections": len(notifiers),
        "notify_errors": sum(notifier.errors for notifier in notifiers),
    }
    for notifier in notifiers:
        await notifier.close()
    await counter.close()
    return result


async def latency(args: argparse.Namespace) -> dict[str, Any]:
    """One writer at a fixed rate, N readers: time from send to receipt of every copy."""
    pool, tally = Pool(args), Tally()
    readers, _ = await pool.open(args.readers, "r", tally)
    writers, _ = await pool.open(1, "w", Tally())
    if len(readers) < args.readers or not writers:
        raise RuntimeError(f"only {len(readers)} readers, {len(writers)} writer: {pool.failures}")
    writer = writers[0]
    count = len(readers)
    pad = padding(args.payload_size)
    await probe_until(lambda: writer.send_text(b"0 " + pad), tally, count, "latency")
    samples: array.array[int] = array.array("q")
    for client in readers:
        client.samples = samples
        client.until = 0
    frames0 = tally.value
    loop = asyncio.get_running_loop()
    measured = Window()
    rate: float = args.rate
    total = int(rate * (args.warmup + args.duration))
    warm = int(rate * args.warmup)
    sent = 0
    started = loop.time()
    while sent < total:
        due = min(total, int((loop.time() - started) * rate) + 1)
        while sent < due:
            if sent == warm:
                measured.start()
                since = time.perf_counter_ns()
                for client in readers:
                    client.since, client.until = since, 2**62
            writer.send_text(b"%d %s" % (time.perf_counter_ns(), pad))
            sent += 1
        # uvloop's timers tick in whole milliseconds: a shorter sleep returns at once and the
        # loop would spin, so wait at least 1 ms and send what has come due (1-2 at 1,000/s).
        await asyncio.sleep(max(0.001, started + sent / rate - loop.time()))
    until = time.perf_counter_ns()
    for client in readers:
        client.until = until
    await measured.stop()
    expected = sent * count
    await tally.wait_quiet(quiet=1.0, within=args.drain_timeout, target=frames0 + expected)
    received = tally.value - frames0
    ordered = sorted(samples)

    def quantile(q: float) -> float:
        if not ordered:
            return math.nan
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6

    result = {
        "p50_ms": quantile(0.50),
        "p95_ms": quantile(0.95),
        "p99_ms": quantile(0.99),
        "max_ms": ordered[-1] / 1e6 if ordered else math.nan,
        "samples": len(ordered),
        "loss_frac": max(0, expected - received) / expected if expected else 0.0,
        "lost": expected - received,
        "rate": rate,
        "readers": count,
        "unparsed": sum(client.unparsed for client in readers),
        "closed_by_server": pool.closed_by_server(),
        "seconds": measured.seconds,
        "loadgen_cpu_pct": measured.cpu_pct,
    }
    pool.reset_all()
    return result


async def connections(args: argparse.Namespace) -> dict[str, Any]:
    """Open idle readers in steps; at each step, pause for the runner to measure the server."""
    pool, tally = Pool(args), Tally()
    steps: list[dict[str, Any]] = []
    held = 0
    for step in sorted(args.steps):
        CONTROL.mark(
            "measure_start"
        )  # the runner samples CPU while sockets open, until the checkpoint
        cpu = cpu_seconds()
        opened, seconds = await pool.open(step - held, "r", tally)
        held += len(opened)
        record = {
            "step": step,
            "sockets": held,
            "opened": len(opened),
            "seconds": seconds,
            "handshakes_per_s": len(opened) / seconds if seconds else 0.0,
            "failed": pool.failed(),
            "loadgen_cpu_pct": 100 * (cpu_seconds() - cpu) / seconds if seconds else 0.0,
        }
        steps.append(record)
        CONTROL.mark("checkpoint", **record)
        await CONTROL.answered(within=args.checkpoint_timeout)
    opened_total = sum(record["opened"] for record in steps)
    seconds_total = sum(record["seconds"] for record in steps)
    result = {
        "steps": steps,
        "handshakes_per_s": opened_total / seconds_total if seconds_total else 0.0,
        "failed": pool.failed(),
        "failures": {str(status): n for status, n in pool.failures.items()},
        "closed_by_server": pool.closed_by_server(),
    }
    pool.reset_all()
    return result


SCENARIOS: dict[str, Callable[[argparse.Namespace], Awaitable[dict[str, Any]]]] = {
    "fanout": fanout,
    "ingest": ingest,
    "latency": latency,
    "connections": connections,
    "notify": notify,
    "sqlsend": sqlsend.sqlsend,
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line: one subcommand per scenario, common options first."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--host", default="127.0.0.1")
    common.add_argument("--port", type=int, default=3000)
    common.add_argument("--secret", default="bench-secret")
    common.add_argument("--channel", default="bench")
    common.add_argument(
        "--path-form",
        choices=["token", "channel"],
        default="token",
        help="URL form: /<jwt> or /<channel>/<jwt>",
    )
    common.add_argument("--db-uri", default="")
    common.add_argument("--listen-channel", default="postgres-websockets-listener")
    common.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    common.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    common.add_argument("--drain-timeout", type=float, default=10.0)
    common.add_argument(
        "--stall-timeout",
        type=float,
        default=1.0,
        help="a closed loop that sees no progress for this long writes the rest off",
    )
    common.add_argument("--payload-size", type=int, default=150, help="bytes of filler")
    common.add_argument("--connect-concurrency", type=int, default=64)
    common.add_argument("--connect-timeout", type=float, default=10.0)
    common.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    common.add_argument(
        "--sync", action="store_true", help="wait for a line on stdin after each marker (runner)"
    )
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="scenario", required=True)
    fan = sub.add_parser("fanout", parents=[common])
    fan.add_argument("--readers", type=int, default=1000)
    fan.add_argument(
        "--window-frames",
        type=int,
        default=100000,
        help="frames in flight: window = this / readers messages, at least 2",
    )
    fan.add_argument(
        "--per-transaction", type=int, default=1, help="NOTIFYs the producer commits together"
    )
    fan.add_argument(
        "--protocol",
        choices=["legacy", "v2"],
        default="legacy",
        help="readers: token in the path, or pgws.v2 with `auth` and `sub` frames (SPEC 8)",
    )
    fan.add_argument(
        "--producer",
        choices=["notify", "send"],
        default="notify",
        help="pg_notify on the listen channel, or pgws.send on the channel (durable)",
    )
    ing = sub.add_parser("ingest", parents=[common])
    ing.add_argument("--writers", type=int, default=10)
    ing.add_argument(
        "--count",
        choices=["listen", "stored"],
        default="listen",
        help="NOTIFYs seen by LISTEN, or rows stored on the channel (durable)",
    )
    ing.add_argument("--window-per-writer", type=int, default=50)
    lat = sub.add_parser("latency", parents=[common])
    lat.add_argument("--readers", type=int, default=100)
    lat.add_argument("--rate", type=float, default=1000.0, help="messages per second")
    con = sub.add_parser("connections", parents=[common])
    con.add_argument("--steps", type=int, nargs="+", default=[1000, 5000, 10000])
    con.add_argument("--checkpoint-timeout", type=float, default=60.0)
    raw = sub.add_parser("notify", parents=[common])
    raw.add_argument("--connections", type=int, default=2)
    raw.add_argument("--window-per-connection", type=int, default=200)
    sqlsend.add_arguments(sub.add_parser("sqlsend", parents=[common]))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Run one scenario and print its result as the last JSON line."""
    args = parse_args(argv)
    wanted = max([*getattr(args, "steps", [0]), getattr(args, "readers", 0)]) + 1024
    limit = raise_nofile_limit(wanted)

    async def run() -> None:
        if args.sync:
            await CONTROL.open()
        try:
            result = await SCENARIOS[args.scenario](args)
        except (RuntimeError, OSError, TimeoutError) as exc:
            emit("result", scenario=args.scenario, error=f"{type(exc).__name__}: {exc}")
            raise SystemExit(1) from None
        emit("result", scenario=args.scenario, nofile=limit, **result)

    if args.loop == "uvloop":
        import uvloop

        uvloop.run(run())
    else:
        asyncio.run(run())


if __name__ == "__main__":
    main()
