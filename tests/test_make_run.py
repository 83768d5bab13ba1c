"""`make run` for a newcomer (issue 13 item 7): installs what running needs, nothing for
development; prints its banner only once the port is bound, with how to stop it and change the
port; a URL and token from the banner work the moment it is printed."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from tests.conftest import TIMEOUT, channel_name, recv_json

ROOT = Path(__file__).parent.parent


@pytest.mark.nodb
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_run_installs_pgws_and_the_embedded_database_only(tmp_path: Path) -> None:
    """On a fresh checkout (`make -n`, nothing run) the only install is `-e .[embedded]`, and
    that extra is PostgreSQL's binaries alone: none of the development tools."""
    # Outside any make of ours: under `make test` (CI) a sub-make would print its directory.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    result = subprocess.run(
        ["make", "--no-print-directory", "-n", "run", f"VENV={tmp_path / 'venv'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    installs = [shlex.split(line) for line in result.stdout.splitlines() if "pip install" in line]
    assert [words[words.index("install") + 1 :] for words in installs] == [
        ["--quiet", "-e", ".[embedded]"]
    ]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert [re.split(r"[<>=]", spec)[0] for spec in extras["embedded"]] == ["pgserver"]
    assert "dev.demo" in result.stdout.splitlines()[-1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_banner_comes_once_the_port_listens_and_says_how_to_stop(dsn: str) -> None:
    """What `make run` runs, with a database given: the banner's socket URL opens at once (no
    retry) and round-trips a message; it says Ctrl-C and PGWS_PORT; Ctrl-C exits 0."""
    env = {
        **{key: value for key, value in os.environ.items() if not key.startswith("PGWS_")},
        "PGWS_DB_URI": dsn,
        "PGWS_HOST": "127.0.0.1",
        "PGWS_PORT": str(free_port()),
        "PGWS_LISTEN_CHANNEL": channel_name(),
        "PGWS_ROOT_PATH": str(ROOT / "example"),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dev.demo", "--env-file", "sample-env",
        cwd=ROOT, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        banner: list[str] = []
        async with asyncio.timeout(TIMEOUT):
            while not banner or "Ctrl-C stops it" not in banner[-1]:
                line = await process.stdout.readline()
                assert line, f"exited before its banner: {''.join(banner)}"
                banner.append(line.decode())
        text = "".join(banner)
        assert "Another port: PGWS_PORT=3001 make run" in text
        [url] = re.findall(r"ws://\S+/chat/\S+", text)
        assert url.startswith(f"ws://127.0.0.1:{env['PGWS_PORT']}/chat/")
        async with connect(url, open_timeout=TIMEOUT) as ws:
            await ws.send("hello from the banner")
            envelope = await recv_json(ws)
        assert envelope["payload"] == "hello from the banner"
        process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        async with asyncio.timeout(TIMEOUT):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
