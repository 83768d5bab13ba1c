"""Peak memory of `pgws serve` with N readers that never read, through one burst (issue 8 item 11).

Each stalled reader is a raw socket with a 4 KiB receive buffer that reads its handshake answer
and nothing more; one fast reader on the same channel reads everything. The burst is one
transaction of NOTIFYs, large enough to get past the kernel's socket buffers (up to tcp_wmem's
maximum per socket) and each socket's PGWS_CLIENT_MAX_BUFFER. Reported: the server's resident
memory before the burst and its peak (VmHWM), what /metrics says afterwards, and whether the
fast reader got every message.

    .venv/bin/python -m bench.stalled_readers --readers 400
    .venv/bin/python -m bench.stalled_readers --readers 400 --server-env PGWS_MAX_BUFFERED_TOTAL=0

The database is PGWS_TEST_DB_URI (or --db-uri), else a throwaway cluster from dev.devdb.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import IO, Any

import psycopg

from bench.procs import free_port, spawn, stop
from bench.wire import handshake_request, handshake_status, make_token, raise_nofile_limit

SECRET = "stalled-readers-bench-secret-0123456789abcdef"
PAYLOAD_BYTES = 7000


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in KiB: resident now, and the most it ever was."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


async def open_socket(port: int, path: str, rcvbuf: int | None) -> tuple[Any, Any]:
    """A WebSocket opened by hand; returns the asyncio (reader, writer) after the 101."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    request, accept = handshake_request("127.0.0.1", port, path)
    writer.write(request)
    status = handshake_status(await reader.readuntil(b"\r\n\r\n"), accept)
    if status != 101:
        raise RuntimeError(f"handshake answered {status}")
    return reader, writer


async def count_frames(reader: asyncio.StreamReader, wanted: int) -> None:
    """Read server frames (unmasked) until `wanted` text frames came."""
    seen = 0
    while seen < wanted:
        first, second = await reader.readexactly(2)
        length = second & 0x7F
        if length == 126:
            length = int.from_bytes(await reader.readexactly(2), "big")
        elif length == 127:
            length = int.from_bytes(await reader.readexactly(8), "big")
        await reader.readexactly(length)
        if first & 0x0F == 0x1:
            seen += 1


async def metrics(port: int) -> dict[str, float]:
    """The gateway's /metrics as name → value (first sample of each name)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
    raw = await reader.read()
    writer.close()
    values: dict[str, float] = {}
    for line in raw.partition(b"\r\n\r\n")[2].decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values.setdefault(name, float(value))
    return values


@contextlib.asynccontextmanager
async def database(uri: str | None) -> AsyncIterator[str]:
    """The database to use: the one given, else a throwaway cluster for this run."""
    if uri:
        yield uri
        return
    from dev.devdb import ThrowawayPostgres

    with ThrowawayPostgres() as cluster:
        yield cluster.uri


async def wait_ready(port: int, within: float) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /ready HTTP/1.1\r\nHost: localhost\r\n\r\n")
            answer = await reader.read()
            writer.close()
            if answer.startswith(b"HTTP/1.1 200"):
                return
        await asyncio.sleep(0.1)
    raise RuntimeError("pgws serve did not get ready")


async def run(args: argparse.Namespace, log: IO[bytes]) -> dict[str, Any]:
    """One measurement; returns its figures."""
    raise_nofile_limit(args.readers + 256)
    channel = f"bench-{uuid.uuid4().hex[:8]}"
    listen_channel = f"bench-listen-{uuid.uuid4().hex[:8]}"
    async with database(args.db_uri or os.environ.get("PGWS_TEST_DB_URI")) as uri:
        port = free_port()
        env = {
            "PATH": os.environ.get("PATH", ""),
            "PGWS_DB_URI": uri,
            "PGWS_JWT_SECRET": SECRET,
            "PGWS_HOST": "127.0.0.1",
            "PGWS_PORT": str(port),
            "PGWS_LISTEN_CHANNEL": listen_channel,
            **dict(item.split("=", 1) for item in args.server_env),
        }
        server = await spawn(
            [sys.executable, "-m", "pgws", "serve", "--json-logs"], env=env, log=log
        )
        try:
            await wait_ready(port, 30.0)
            path = f"/{channel}/{make_token(SECRET, {'mode': 'r'})}"
            stalled = [await open_socket(port, path, 4096) for _ in range(args.readers)]
            fast_reader, fast_writer = await open_socket(port, path, None)
            await asyncio.sleep(1.0)  # every socket subscribed; memory settled
            rss_before, _ = memory_kib(server.pid)
            count = args.burst_bytes // PAYLOAD_BYTES
            reading = asyncio.create_task(count_frames(fast_reader, count))
            started = time.monotonic()
            async with await psycopg.AsyncConnection.connect(uri, autocommit=True) as db:
                await db.execute(
                    "SELECT pg_notify(%s, json_build_object('channel', %s::text, 'payload',"
                    " repeat('x', %s), 'n', n)::text) FROM generate_series(1, %s) AS n",
                    (listen_channel, channel, PAYLOAD_BYTES, count),
                )
            async with asyncio.timeout(args.within):
                await reading
            delivered = time.monotonic() - started
            await asyncio.sleep(3.0)  # past DROP_GRACE: per-socket drops are done too
            rss_after, peak = memory_kib(server.pid)
            figures = await metrics(port)
            for _, writer in [*stalled, (fast_reader, fast_writer)]:
                writer.transport.abort()
        finally:
            await stop(server)
    return {
        "readers": args.readers,
        "burst_bytes": count * PAYLOAD_BYTES,
        "server_env": args.server_env,
        "rss_before_mib": round(rss_before / 1024, 1),
        "rss_peak_mib": round(peak / 1024, 1),
        "rss_after_mib": round(rss_after / 1024, 1),
        "fast_reader_got_all": True,
        "fast_reader_seconds": round(delivered, 2),
        "slow_consumers_closed": figures.get("pgws_slow_consumers_closed_total"),
        "buffered_total_drops": figures.get("pgws_buffered_total_drops_total"),
        "buffered_bytes_after": figures.get("pgws_buffered_bytes"),
        "buffered_peak_mib": round(figures.get("pgws_buffered_bytes_peak", 0) / 2**20, 1),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--readers", type=int, default=400, help="stalled readers (400)")
    parser.add_argument(
        "--burst-bytes",
        type=int,
        default=8 * 1024 * 1024,
        help="payload bytes in the burst, in 7000-byte notifications (8 MiB)",
    )
    parser.add_argument(
        "--server-env", action="append", default=[], help="KEY=VALUE for pgws serve (repeatable)"
    )
    parser.add_argument("--db-uri", default=None, help="database (default PGWS_TEST_DB_URI)")
    parser.add_argument("--log", type=Path, default=None, help="keep the server's log here")
    parser.add_argument("--within", type=float, default=120.0, help="seconds for the burst")
    args = parser.parse_args(argv)
    with args.log.open("wb") if args.log else tempfile.TemporaryFile() as log:
        result = asyncio.run(run(args, log))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
