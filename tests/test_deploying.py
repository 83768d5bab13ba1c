"""README "Deploying", step by step, where a machine can check it (issue 13 item 8).

The commands, settings and config blocks are read from README.md itself, so the recipe and what is
tested cannot drift apart: the wheel the install step builds, the role the database step creates,
the env file's settings, a real nginx running the README's server block (with a test certificate)
in front of `pgws serve`, and the Prometheus job's target.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import shutil
import ssl
import subprocess
import sys
import uuid
import zipfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from websockets.asyncio.client import connect

from pgws import __version__
from pgws.config import Config
from pgws.db.connect import check_db_uri
from pgws.envfile import parse_env_file
from pgws.places import metrics_address
from tests.conftest import TIMEOUT, ServeProcess, channel_name, make_token, recv_json, run_pgws
from tests.test_tls import Pki, client_context, pki  # noqa: F401 (pki is a fixture)

ROOT = Path(__file__).parent.parent
NGINX = Path("/usr/sbin/nginx")
# A second loopback address: the client's, so that it differs from nginx's (127.0.0.1).
CLIENT_ADDRESS = "127.0.0.2"


def deploying() -> str:
    """The README's Deploying section."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("\n## Deploying\n")
    return readme[start : readme.index("\n## ", start + 1)]


def blocks(language: str) -> list[str]:
    """The fenced blocks of one language in the Deploying section, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", deploying(), flags=re.MULTILINE | re.DOTALL)


def shell_lines() -> list[str]:
    """Every command of the section's shell blocks, comments dropped."""
    return [
        line.split("  #", 1)[0].strip()
        for block in blocks("sh")
        for line in block.splitlines()
        if line.strip() and not line.startswith("#")
    ]


def env_block() -> str:
    [block] = [block for block in blocks("sh") if "export PGWS_DB_URI" in block]
    return block


def deployed_settings(tmp_path: Path) -> dict[str, str]:
    """sample-env edited as step 4 says: its values, with the README's lines over them."""
    edits = tmp_path / "edits.env"
    edits.write_text(env_block())
    return {**parse_env_file(ROOT / "sample-env"), **parse_env_file(edits)}


def nginx_block() -> str:
    [block] = blocks("nginx")
    return block


def prometheus_targets() -> list[str]:
    [block] = blocks("yaml")
    return re.findall(r'"([^"]+)"', block.split("targets:", 1)[1])


# --- 1. install -------------------------------------------------------------------------------


@pytest.mark.nodb
def test_the_wheel_holds_pgws_and_runs(tmp_path: Path) -> None:
    """The README's `pip wheel` command, run in a copy of the checkout: the wheel has every
    module, the durable schema and the `pgws` command, no tests or dev tools, and runs."""
    [build] = [line for line in shell_lines() if " wheel " in line]
    source = tmp_path / "checkout"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "pgws", source / "pgws", ignore=shutil.ignore_patterns("__pycache__"))
    words = shlex.split(build)
    assert words[:2] == ["/opt/pgws/bin/pip", "wheel"]
    subprocess.run(
        [sys.executable, "-m", "pip", *words[1:]],
        cwd=source, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    [wheel] = (source / "dist").glob("pgws-*-py3-none-any.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "pgws").rglob("*.py")}
    assert modules <= names
    assert "pgws/db/durable.sql" in names
    assert not any(name.startswith(("tests/", "dev/", "bench/")) for name in names)
    [entry_points] = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
    assert "pgws = pgws.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    # Run from the wheel itself (a pure wheel imports from its zip), dependencies from this venv.
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(wheel)}
    ran = subprocess.run(
        [sys.executable, "-c", "import pgws.cli, sys; print(pgws.cli.__file__); pgws.cli.main()",
         "--version"],
        env=env, capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert ran.stdout.startswith(str(wheel)), ran.stdout + ran.stderr
    assert __version__ in ran.stdout


# --- 2. the database role ---------------------------------------------------------------------


async def test_a_role_with_login_only_passes_pgws_check(dsn: str) -> None:
    """The README's CREATE ROLE and GRANT (another role name and password, this database):
    `pgws check` connecting as that role passes LISTEN and NOTIFY."""
    statements = [
        match
        for line in shell_lines()
        if line.startswith("sudo -u postgres psql -c")
        for match in re.findall(r'-c "([^"]+)"', line)
    ]
    assert [s.split()[0] for s in statements] == ["CREATE", "GRANT"]
    role, password = f"pgws_deploy_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as db:
        database = (await (await db.execute("SELECT current_database()")).fetchone() or [""])[0]
        for statement in statements:
            statement = re.sub(r"\bpgws\b", role, statement).replace("change-me", password)
            statement = re.sub(r"\bDATABASE app\b", f'DATABASE "{database}"', statement)
            await db.execute(statement.encode())
        try:
            info = {**conninfo_to_dict(dsn), "user": role, "password": password}
            env = {
                "PGWS_DB_URI": make_conninfo("", **info),
                "PGWS_JWT_SECRET": "x" * 48,
                "PGWS_LISTEN_CHANNEL": channel_name(),
            }
            result = await asyncio.to_thread(run_pgws, "check", env=env)
            assert result.returncode == 0, result.stdout + result.stderr
            assert "FAIL" not in result.stdout
        finally:
            await db.execute(f'REVOKE ALL ON DATABASE "{database}" FROM {role}'.encode())
            await db.execute(f"DROP ROLE {role}".encode())


# --- 4. the env file --------------------------------------------------------------------------


@pytest.mark.nodb
def test_the_env_file_is_valid_and_agrees_with_nginx_and_prometheus(tmp_path: Path) -> None:
    """sample-env with the README's lines is a valid configuration: loopback only, nginx trusted,
    metrics on their own port; nginx proxies to that port, Prometheus scrapes that listener."""
    config = Config.from_env(deployed_settings(tmp_path), check_db_uri=check_db_uri)
    assert config.host == "127.0.0.1"
    assert config.trusted_proxies == ("127.0.0.1/32", "::1/128")
    assert f"proxy_pass http://127.0.0.1:{config.port};" in nginx_block()
    assert config.metrics == "127.0.0.1:9187"
    assert prometheus_targets() == [config.metrics]
    # The unit reads the file this section installs, and runs the command it installs.
    unit = (ROOT / "systemd" / "pgws.service").read_text()
    assert "install -m 600 sample-env /etc/pgws/pgws.env" in shell_lines()
    assert "LoadCredential=env:/etc/pgws/pgws.env" in unit.splitlines()
    assert "python3 -m venv /opt/pgws" in shell_lines()
    assert "/opt/pgws/bin/pip install dist/pgws-*.whl" in shell_lines()
    assert "ExecStart=/opt/pgws/bin/pgws serve" in unit.splitlines()


# --- 5 and 7: TLS and nginx -------------------------------------------------------------------


def nginx_conf(folder: Path, pgws_port: int, nginx_port: int, pki: Pki) -> Path:  # noqa: F811
    """nginx.conf around the README's block, as Debian's nginx.conf includes a site: this run's
    ports (loopback only), the test certificate, every path inside `folder`."""
    block = nginx_block()
    replacements = {
        "proxy_pass http://127.0.0.1:3000;": f"proxy_pass http://127.0.0.1:{pgws_port};",
        "listen 443 ssl;": f"listen 127.0.0.1:{nginx_port} ssl;",
        "listen [::]:443 ssl;": f"listen [::1]:{nginx_port} ssl;",
        "/etc/letsencrypt/live/pgws.example.com/fullchain.pem": str(pki.leaf),
        "/etc/letsencrypt/live/pgws.example.com/privkey.pem": str(pki.leaf_key),
    }
    for old, new in replacements.items():
        assert old in block, old
        block = block.replace(old, new)
    temp = {name: folder / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    conf = folder / "nginx.conf"
    conf.write_text(
        f"daemon off;\nmaster_process off;\npid {folder / 'nginx.pid'};\n"
        f"error_log {folder / 'error.log'} info;\nevents {{ worker_connections 64; }}\n"
        "http {\n"
        f"    access_log {folder / 'access.log'};\n"
        + "".join(f"    {name}_temp_path {path};\n" for name, path in temp.items()).replace(
            "body_temp", "client_body_temp"
        )
        + block
        + "}\n"
    )
    return conf


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.asynccontextmanager
async def running_nginx(conf: Path, port: int) -> AsyncIterator[None]:
    """nginx in the foreground with `conf`, once it accepts on `port`; stopped afterwards."""
    folder = conf.parent
    process = await asyncio.create_subprocess_exec(
        str(NGINX), "-p", str(folder), "-c", str(conf), "-e", str(folder / "error.log"),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with asyncio.timeout(TIMEOUT):
            while True:  # nginx tells nobody it listens: try until it does, or exits
                if process.returncode is not None:
                    raise AssertionError((folder / "error.log").read_text())
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except ConnectionRefusedError:
                    await asyncio.sleep(0.05)
                    continue
                writer.close()
                break
        yield
    finally:
        if process.returncode is None:
            process.terminate()
        async with asyncio.timeout(TIMEOUT):
            await process.wait()


async def https_get(port: int, path: str, context: ssl.SSLContext) -> bytes:
    """The status line of GET `path` over TLS to 127.0.0.1:`port`."""
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: pgws.example.com\r\n\r\n".encode())
        await writer.drain()
        status = await reader.readline()
        writer.close()
    return status.strip()


async def start_deployed(
    serve_process: Callable[..., Any], tmp_path: Path
) -> tuple[ServeProcess, int]:
    """`pgws serve` with the README's proxy and metrics settings (ports: any free one)."""
    settings = deployed_settings(tmp_path)
    return await serve_process(  # type: ignore[no-any-return]
        PGWS_HOST=settings["PGWS_HOST"],
        PGWS_TRUSTED_PROXIES=settings["PGWS_TRUSTED_PROXIES"],
        PGWS_METRICS="127.0.0.1:0",
    )


@pytest.mark.skipif(not NGINX.exists(), reason=f"{NGINX} is not installed (apt install nginx)")
async def test_nginx_proxies_websockets_and_pgws_logs_the_client(
    serve_process: Callable[..., Any],
    tmp_path: Path,
    pki: Pki,  # noqa: F811
) -> None:
    """The README's nginx block in front of `pgws serve`: a wss:// socket from 127.0.0.2 through
    it round-trips a message and pgws logs 127.0.0.2 (from X-Forwarded-For), not nginx's address
    nor the ones the client wrote itself; /metrics is not public; the same headers sent to pgws
    directly are not believed."""
    serving, pgws_port = await start_deployed(serve_process, tmp_path)
    nginx_port = free_port()
    conf = nginx_conf(tmp_path, pgws_port, nginx_port, pki)
    spoofed = {"X-Forwarded-For": "6.6.6.6", "Forwarded": "for=6.6.6.7"}
    chat = channel_name()
    token = make_token({"mode": "rw"})
    async with running_nginx(conf, nginx_port):
        async with connect(
            f"wss://127.0.0.1:{nginx_port}/{chat}/{token}",
            ssl=client_context(pki),
            local_addr=(CLIENT_ADDRESS, 0),
            additional_headers=spoofed,
            open_timeout=TIMEOUT,
        ) as ws:
            await ws.send("through nginx")
            envelope = await recv_json(ws)
        assert envelope["payload"] == "through nginx"
        connected = await serving.wait_for_event("client_connected")
        assert connected["remote"] == CLIENT_ADDRESS
        assert await https_get(nginx_port, "/metrics", client_context(pki)) == (
            b"HTTP/1.1 404 Not Found"
        )
        assert await https_get(nginx_port, "/ready", client_context(pki)) == b"HTTP/1.1 200 OK"
    seen = len(serving.events)
    async with connect(
        f"ws://127.0.0.1:{pgws_port}/{chat}/{token}",
        local_addr=(CLIENT_ADDRESS, 0),
        additional_headers={"X-Forwarded-For": "6.6.6.6"},
        open_timeout=TIMEOUT,
    ):
        direct = await serving.wait_for_event("client_connected", after=seen)
    assert direct["remote"].startswith(f"{CLIENT_ADDRESS}:")  # its own address and port


# --- 8. Prometheus ----------------------------------------------------------------------------


async def test_prometheus_job_scrapes_the_metrics_listener(
    serve_process: Callable[..., Any], tmp_path: Path
) -> None:
    """The job's target is PGWS_METRICS (checked above); that listener answers a scrape in the
    Prometheus text format, with pgws's metrics (a free port stands in for 9187)."""
    [target] = prometheus_targets()
    assert metrics_address(deployed_settings(tmp_path)["PGWS_METRICS"]) == ("127.0.0.1", 9187)
    assert target == "127.0.0.1:9187"
    serving, _ = await start_deployed(serve_process, tmp_path)
    port = int((await serving.wait_for_event("metrics_listening"))["port"])
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/plain\r\n\r\n")
        await writer.drain()
        raw = await reader.read()
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"Content-Type: text/plain; version=" in head
    names = {family.name for family in text_string_to_metric_families(body.decode())}
    assert {"pgws_sockets_open", "pgws_listener_up", "pgws_messages_delivered"} <= names
