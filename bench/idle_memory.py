"""Server memory per idle client: WebSockets next to SSE streams (`GET /events`), same run.

    .venv/bin/python -m bench.idle_memory                 # 2,000 clients of each kind
    .venv/bin/python -m bench.idle_memory --clients 5000

For each kind, a fresh `pgws serve` (the same settings) is measured before and after `--clients`
idle clients connected and were answered (101 for a socket reading one channel; 200 and the
stream's first `id:` for a stream of that channel), and the growth of its VmRSS per client is
reported, with the SSE figure as a ratio to the socket one (SPEC 9 / issue 12: an idle stream
should cost no more than an idle socket). Needs a PostgreSQL: PGWS_TEST_DB_URI, else
postgresql://127.0.0.1:5432/test. Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import signal
import tempfile
from pathlib import Path

from bench.static_memory import proc_status, start_server
from bench.wire import make_token, raise_nofile_limit

SECRET = "bench-secret-bench-secret-bench-secret!!"  # what start_server configures
CHANNEL = "bench-idle"
KIB = 1024


async def open_socket(port: int, token: str) -> asyncio.StreamWriter:
    """A legacy reader socket on CHANNEL, upgraded (101), then left idle."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /{CHANNEL}/{token} HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    writer.write(request.encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise SystemExit(f"socket refused: {head[:60]!r}")
    return writer


async def open_stream(port: int, token: str) -> asyncio.StreamWriter:
    """An event stream of CHANNEL, answered (200, first `id:`), then left idle."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET /events?ch={CHANNEL} HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n"
        f"Authorization: Bearer {token}\r\n\r\n".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"stream refused: {head[:60]!r}")
    await reader.readuntil(b"\n\n")  # `id: pgws`: the stream is registered
    return writer


async def measure(kind: str, clients: int, db_uri: str) -> tuple[int, int]:
    """(RSS before, RSS with `clients` idle clients of `kind`) of a fresh server."""
    opener = open_socket if kind == "socket" else open_stream
    token = make_token(SECRET, {"mode": "r", "channels": [CHANNEL]})
    with tempfile.TemporaryDirectory(prefix="pgws-bench-idle-") as folder:
        server, port = start_server(Path(folder), db_uri)
        writers: list[asyncio.StreamWriter] = []
        try:
            await opener(port, token)  # one first: warm the code paths before the baseline
            await asyncio.sleep(0.5)
            before = proc_status(server.pid)["VmRSS"]
            limit = asyncio.Semaphore(64)

            async def one() -> None:
                async with limit:
                    writers.append(await opener(port, token))

            async with asyncio.timeout(120):
                await asyncio.gather(*(one() for _ in range(clients)))
            await asyncio.sleep(1.0)  # a bench, not a test: let the server settle
            during = proc_status(server.pid)["VmRSS"]
        finally:
            for writer in writers:
                writer.close()
            # Closed for real before the next server starts (its pipe must get a low fd).
            await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)
            server.send_signal(signal.SIGTERM)
            server.wait(30)
    return before, during


async def main_async(args: argparse.Namespace) -> None:
    raise_nofile_limit(2 * args.clients + 256)
    rows = []
    for kind in ("socket", "sse"):
        before, during = await measure(kind, args.clients, args.db_uri)
        rows.append((kind, before, during, (during - before) / args.clients / KIB))
    per_socket = rows[0][3]
    print(
        "| idle clients | kind | RSS before | RSS with them | KiB per client | ratio to sockets |"
    )
    print("|---|---|---|---|---|---|")
    for kind, before, during, per in rows:
        ratio = per / per_socket if per_socket > 0 else float("nan")
        print(
            f"| {args.clients:,} | {kind} | {before / KIB / KIB:.1f} MiB "
            f"| {during / KIB / KIB:.1f} MiB | {per:.2f} | {ratio:.2f}x |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument(
        "--db-uri",
        default=os.environ.get("PGWS_TEST_DB_URI", "postgresql://127.0.0.1:5432/test"),
    )
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
