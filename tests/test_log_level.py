"""PGWS_LOG_LEVEL and --log-level on a real `pgws serve` (issue 13 item 3)."""

from __future__ import annotations

import asyncio
import os
import socket
import sys

from websockets.asyncio.client import connect

from tests.conftest import SECRET, TIMEOUT, make_token


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def serve_until_a_socket_came_and_went(dsn: str, *args: str, **env: str) -> str:
    """Run `pgws serve`, open and close one socket once it listens, stop it; return its stderr."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pgws", "serve", "--json-logs", *args,
        env={
            "PATH": os.environ.get("PATH", ""), "PGWS_DB_URI": dsn, "PGWS_JWT_SECRET": SECRET,
            "PGWS_HOST": "127.0.0.1", "PGWS_PORT": str(port), **env,
        },
        stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        token = make_token({"mode": "rw", "channels": ["chat"]})
        async with asyncio.timeout(TIMEOUT):
            while True:  # no server_started line to wait for at warning level
                try:
                    async with connect(f"ws://127.0.0.1:{port}/chat/{token}") as ws:
                        await ws.send("hello")
                    break
                except OSError:
                    await asyncio.sleep(0.05)
    finally:
        process.terminate()
        async with asyncio.timeout(TIMEOUT):
            _, stderr = await process.communicate()
    return stderr.decode()


async def test_log_level_warning_silences_per_socket_lines(dsn: str) -> None:
    """Thousands of reconnecting clients need not mean thousands of lines (issue 13 item 3)."""
    for args, env in [((), {"PGWS_LOG_LEVEL": "warning"}), (("--log-level", "WARNING"), {})]:
        stderr = await serve_until_a_socket_came_and_went(dsn, *args, **env)
        assert "client_connected" not in stderr
        assert "server_started" not in stderr
    stderr = await serve_until_a_socket_came_and_went(dsn)  # the default stays info
    assert "client_connected" in stderr


async def test_log_level_debug_never_shows_the_token(dsn: str) -> None:
    """websockets logs request paths at debug; paths hold tokens, so it stays at info."""
    stderr = await serve_until_a_socket_came_and_went(dsn, PGWS_LOG_LEVEL="debug")
    assert "client_connected" in stderr
    assert "eyJ" not in stderr  # every JWT starts so
