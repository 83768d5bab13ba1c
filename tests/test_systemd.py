"""sd_notify against a real unix datagram socket standing in for systemd (SPEC 6)."""

from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from pgws.systemd import SystemdNotifier
from tests.conftest import TIMEOUT


@pytest.fixture
def notify_socket(tmp_path: Path) -> Any:
    """A datagram socket like the one systemd passes in NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    yield path, sock
    sock.close()


async def next_state(sock: socket.socket) -> str:
    """The next datagram, bounded."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(TIMEOUT):
        data = await loop.sock_recv(sock, 4096)
    return data.decode()


async def test_serve_reports_ready_watchdog_and_stopping(
    serve_process: Any, notify_socket: Any
) -> None:
    """`pgws serve` sends READY=1 once serving, WATCHDOG=1 periodically, STOPPING=1 on SIGTERM."""
    path, sock = notify_socket
    serving, _port = await serve_process(NOTIFY_SOCKET=str(path), WATCHDOG_USEC="200000")
    assert await next_state(sock) == "READY=1"
    assert await next_state(sock) == "WATCHDOG=1"
    assert await next_state(sock) == "WATCHDOG=1"
    serving.process.send_signal(signal.SIGTERM)
    states = set()
    while "STOPPING=1" not in states:
        states.add(await next_state(sock))
    assert await serving.wait_exit() == 0


def test_abstract_socket_names_are_supported() -> None:
    """NOTIFY_SOCKET values starting with @ address the abstract namespace."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0pgws-test-notify")
        notifier = SystemdNotifier("@pgws-test-notify")
        assert notifier.notify("READY=1")
        assert sock.recv(100) == b"READY=1"


def test_without_notify_socket_nothing_is_sent() -> None:
    """Outside systemd, notify() is a no-op that reports False."""
    notifier = SystemdNotifier.from_env({})
    assert not notifier.notify("READY=1")
    assert notifier.watchdog_interval is None


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    """WATCHDOG_USEC=2s means a ping every second; garbage disables the watchdog."""
    assert SystemdNotifier.from_env({"WATCHDOG_USEC": "2000000"}).watchdog_interval == 1.0
    assert SystemdNotifier.from_env({"WATCHDOG_USEC": "soon"}).watchdog_interval is None
