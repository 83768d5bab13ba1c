"""A burst in one transaction while many readers have stopped reading (issue 8, item 1).

Starts `pgws serve` (or --server-cmd) with the LISTEN probe on, opens --stalled readers that
never read (a 4 KiB receive buffer, at most one message queued in the client) and one reader
that reads everything, then NOTIFYs --count payloads of --payload bytes in one transaction.
Meanwhile /health is asked every 20 ms and the server's RSS sampled every 20 ms. Prints one JSON
line and a short table: worst and 99th-percentile /health latency, peak RSS growth, the largest
write buffer a slow consumer reached before its drop, and how long the fast reader took.

    .venv/bin/python -m bench.burst                       # 400 stalled readers, 10 MiB
    .venv/bin/python -m bench.burst --server-cwd ../old   # the same against another checkout
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

import psutil
import psycopg
from websockets.asyncio.client import connect

from bench.wire import make_token, raise_nofile_limit
from dev.devdb import ThrowawayPostgres

SECRET = "bench-secret-bench-secret-bench-secret!!"
CHANNEL = "burst"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def health_latencies(port: int, stop: threading.Event, seen: list[float]) -> None:
    """Ask /health every 20 ms; record how long each answer took (a refusal counts as 10 s).

    A thread with blocking sockets, so the client side's own event loop (hundreds of sockets
    being dropped) does not add to what is measured.
    """
    while not stop.is_set():
        started = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                conn.sendall(b"GET /health HTTP/1.1\r\nHost: bench\r\n\r\n")
                answer = b""
                while b"\r\n\r\n" not in answer:
                    chunk = conn.recv(4096)
                    if not chunk:
                        raise ConnectionError("closed before the answer")
                    answer += chunk
            seen.append(time.monotonic() - started)
        except OSError:
            seen.append(10.0)
        stop.wait(0.02)


def probe_health_until_terminated(port: int) -> None:
    """The prober process: /health latencies as a JSON list on stdout when sent SIGTERM."""
    stop, seen = threading.Event(), list[float]()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    health_latencies(port, stop, seen)
    print(json.dumps(seen))


def sample_rss(process: psutil.Process, stop: threading.Event, peak: list[int]) -> None:
    while not stop.is_set():
        with contextlib.suppress(psutil.Error):
            peak[0] = max(peak[0], process.memory_info().rss)
        stop.wait(0.02)


async def run(args: argparse.Namespace, db_uri: str, log: IO[bytes]) -> dict[str, Any]:
    port = free_port()
    env = {
        **os.environ,
        "PGWS_DB_URI": db_uri,
        "PGWS_JWT_SECRET": SECRET,
        "PGWS_HOST": "127.0.0.1",
        "PGWS_PORT": str(port),
        "PGWS_LISTEN_CHANNEL": "pgws-burst",
        "PGWS_CHECK_LISTENER_INTERVAL": str(args.probe_interval_ms),
    }
    server = await asyncio.create_subprocess_exec(
        *shlex.split(args.server_cmd), env=env, cwd=args.server_cwd, stdout=log, stderr=log
    )
    try:
        token = make_token(SECRET, {"mode": "r", "channels": [CHANNEL]})
        url = f"ws://127.0.0.1:{port}/{CHANNEL}/{token}"
        for _ in range(200):
            if server.returncode is not None:
                raise RuntimeError(f"the server exited with {server.returncode} at start")
            try:
                async with connect(url, open_timeout=1):
                    break
            except OSError:
                await asyncio.sleep(0.05)
        stalled = []
        for _ in range(args.stalled):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port))
            stalled.append(await connect(url, sock=sock, max_queue=1, open_timeout=30))
        fast = await connect(url, max_queue=None, open_timeout=30)
        process = psutil.Process(server.pid)
        rss_before = process.memory_info().rss
        stop, latencies, peak = threading.Event(), [], [rss_before]
        threads = [threading.Thread(target=sample_rss, args=(process, stop, peak))]
        # /health from a process of its own: this one's event loop is busy with the readers.
        prober = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.burst",
            "--probe-health",
            str(port),
            stdout=asyncio.subprocess.PIPE,
        )
        for thread in threads:
            thread.start()
        await asyncio.sleep(0.3)  # a few quiet /health answers before the burst
        started = time.monotonic()
        async with await psycopg.AsyncConnection.connect(db_uri, autocommit=True) as db:
            await db.execute(
                "SELECT pg_notify('pgws-burst', json_build_object('channel', %s::text,"
                " 'payload', repeat('x', %s), 'n', n)::text) FROM generate_series(1, %s) AS n",
                (CHANNEL, args.payload, args.count),
            )
        received = 0
        async with asyncio.timeout(300):
            while received < args.count:
                await fast.recv()
                received += 1
        delivered = time.monotonic() - started
        await asyncio.sleep(1.0)  # let drops and the last /health answers land
        stop.set()
        for thread in threads:
            await asyncio.to_thread(thread.join)
        prober.terminate()
        output, _ = await prober.communicate()
        latencies = json.loads(output)
        for ws in [fast, *stalled]:
            ws.transport.abort()
    finally:
        with contextlib.suppress(ProcessLookupError):
            server.terminate()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(15):
                await server.wait()
        if server.returncode is None:
            server.kill()
    latencies.sort()
    return {
        "stalled": args.stalled,
        "burst_bytes": args.count * args.payload,
        "health_worst_ms": round(latencies[-1] * 1000, 1),
        "health_p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 1),
        "health_median_ms": round(statistics.median(latencies) * 1000, 1),
        "rss_growth_mb": round((peak[0] - rss_before) / 1e6, 1),
        "fast_reader_s": round(delivered, 2),
    }


def drops(log: Path) -> dict[str, Any]:
    """How many slow consumers the server dropped, and the largest buffer one had reached."""
    buffered = []
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if event.get("event") == "client_lagging":
                buffered.append(int(event["buffered"]))
    return {
        "dropped": len(buffered),
        "max_buffered_at_drop_kb": round(max(buffered, default=0) / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stalled", type=int, default=400)
    parser.add_argument("--count", type=int, default=1500)
    parser.add_argument("--payload", type=int, default=7000)
    parser.add_argument("--probe-interval-ms", type=int, default=1000)
    parser.add_argument("--server-cmd", default=f"{sys.executable} -m pgws serve")
    parser.add_argument("--server-cwd", default=None, help="run the server from this checkout")
    parser.add_argument("--db-uri", default=None, help="default: a throwaway cluster")
    parser.add_argument(
        "--keep-log", action="store_true", help="keep the server log, print its path"
    )
    parser.add_argument("--probe-health", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe_health:
        probe_health_until_terminated(args.probe_health)
        return
    raise_nofile_limit(args.stalled + 1024)
    with tempfile.NamedTemporaryFile(
        prefix="pgws-burst-", suffix=".log", delete=not args.keep_log
    ) as log:
        if args.db_uri:
            result = asyncio.run(run(args, args.db_uri, log))
        else:
            with ThrowawayPostgres() as cluster:
                result = asyncio.run(run(args, cluster.uri, log))
        log.flush()
        result.update(drops(Path(log.name)))
        if args.keep_log:
            result["server_log"] = log.name
    print(json.dumps(result))
    for key, value in result.items():
        print(f"{key:>26}  {value}")


if __name__ == "__main__":
    main()
