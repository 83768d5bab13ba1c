"""Memory of `pgws serve` while clients request a big static file and never read it (issue 8, 10).

    .venv/bin/python -m bench.static_memory                      # 30 clients, a 15 MiB file
    .venv/bin/python -m bench.static_memory --clients 60 --size-mib 8

Starts one `pgws serve` (PGWS_ROOT_PATH = a temporary folder holding one file of random bytes),
opens `--clients` raw TCP sockets with a tiny receive buffer that each send one GET and never
read, waits until every one of them has been sent its first bytes, then reads the server's
VmRSS/VmHWM from /proc. One more client then downloads the whole file and checks it byte for
byte, to show the server still serves while the stalled ones are held. Needs a PostgreSQL:
PGWS_TEST_DB_URI, else postgresql://127.0.0.1:5432/test. Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from pathlib import Path

MIB = 1024 * 1024
REPO = Path(__file__).resolve().parent.parent


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in bytes."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def start_server(root: Path, db_uri: str) -> tuple[subprocess.Popen[bytes], int]:
    """`pgws serve` on a free port of 127.0.0.1; returns once it logs server_started."""
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PGWS_DB_URI": db_uri,
        "PGWS_JWT_SECRET": "bench-secret-bench-secret-bench-secret!!",
        "PGWS_HOST": "127.0.0.1",
        "PGWS_PORT": "0",
        "PGWS_ROOT_PATH": str(root),
        "PGWS_LISTEN_CHANNEL": f"bench-static-{os.getpid()}",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "pgws", "serve", "--json-logs"],
        env=env,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert server.stderr is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([server.stderr], [], [], 1.0)
        if not ready:
            continue
        line = server.stderr.readline()
        if not line:
            raise SystemExit("pgws serve exited before server_started")
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if event.get("event") == "server_started":
                # Keep draining its log so a full pipe never blocks it.
                threading.Thread(target=server.stderr.read, daemon=True).start()
                return server, int(event["port"])
    server.kill()
    raise SystemExit("pgws serve did not start within 30 s")


def stalled_client(port: int, name: str) -> socket.socket:
    """A socket that asks for `name` and will never read the answer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET /{name} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
    return sock


def pending_bytes(sock: socket.socket) -> int:
    """Bytes the kernel holds for this socket that nobody has read (FIONREAD)."""
    raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, struct.pack("i", 0))
    value: int = struct.unpack("i", raw)[0]
    return value


def download(port: int, name: str) -> tuple[bytes, float]:
    """The whole response body for GET /name, and the seconds it took."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"GET /{name} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(1 << 20):
            chunks.append(chunk)
    _, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return body, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--clients", type=int, default=30)
    parser.add_argument("--size-mib", type=float, default=15.0)
    parser.add_argument(
        "--db-uri",
        default=os.environ.get("PGWS_TEST_DB_URI", "postgresql://127.0.0.1:5432/test"),
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pgws-bench-static-") as folder:
        data = os.urandom(int(args.size_mib * MIB))
        (Path(folder) / "big.bin").write_bytes(data)
        server, port = start_server(Path(folder), args.db_uri)
        clients: list[socket.socket] = []
        try:
            time.sleep(0.5)  # let start-up allocations settle before the baseline
            before = proc_status(server.pid)
            clients = [stalled_client(port, "big.bin") for _ in range(args.clients)]
            deadline = time.monotonic() + 8  # within websockets' 10 s open timeout
            while time.monotonic() < deadline and not all(pending_bytes(c) for c in clients):
                time.sleep(0.05)
            answered = sum(1 for c in clients if pending_bytes(c))
            time.sleep(1.0)  # a bench, not a test: let the writes settle
            during = proc_status(server.pid)
            body, seconds = download(port, "big.bin")
        finally:
            for sock in clients:
                sock.close()
            server.send_signal(signal.SIGTERM)
            server.wait(30)
    growth = during["VmHWM"] - before["VmRSS"]
    print(
        "| clients | file | answered | RSS before | RSS with stalled | peak RSS | peak growth "
        "| growth per client | full download |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.clients} | {args.size_mib:g} MiB | {answered} | {before['VmRSS'] / MIB:.0f} MiB "
        f"| {during['VmRSS'] / MIB:.0f} MiB | {during['VmHWM'] / MIB:.0f} MiB "
        f"| {growth / MIB:.0f} MiB | {growth / MIB / args.clients:.2f} MiB "
        f"| {'intact' if body == data else 'CORRUPT'}, {seconds:.2f} s |"
    )


if __name__ == "__main__":
    main()
