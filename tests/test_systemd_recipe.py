"""The README's systemd recipe, followed as written, serves as an unprivileged user (issue 8, 5).

systemd itself is not needed: what the unit asks of it is done here the way systemd does it. The
env file (and the TLS files) go into /etc/pgws-like folder readable by root only; each
`LoadCredential=` copies one into a credentials directory that only the service's user can read;
`Environment=` lines get `%d` expanded; `ExecStart=` runs in / as that user (setpriv).
"""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import shlex
import shutil
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from websockets.asyncio.client import connect

from pgws.envfile import parse_env_file
from tests.conftest import SECRET, TIMEOUT, ServeProcess, channel_name, make_token, recv_json
from tests.test_tls import Pki, client_context, pki  # noqa: F401 (pki is a fixture)

ROOT = Path(__file__).parent.parent
UNIT = ROOT / "systemd" / "pgws.service"
SAMPLE_ENV = ROOT / "sample-env"
SERVICE_USER, SERVICE_GROUP = "nobody", "nogroup"
INSTALLED_PGWS = "/opt/pgws/bin/pgws"
EX_CONFIG = 78


def _account_exists() -> bool:
    try:
        pwd.getpwnam(SERVICE_USER)
        grp.getgrnam(SERVICE_GROUP)
    except KeyError:
        return False
    return True


needs_root_and_setpriv = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None or not _account_exists(),
    reason="needs root, setpriv (util-linux) and the nobody/nogroup account to run pgws as an "
    "unprivileged user the way systemd's DynamicUser= does",
)


def service_settings(unit_text: str) -> list[tuple[str, str]]:
    """The `Key=value` lines of the unit's [Service] section, in order, comments skipped."""
    settings, section = [], ""
    for raw in unit_text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            settings.append((key, value))
    return settings


def with_tls_enabled(unit_text: str) -> str:
    """The unit with its commented TLS lines switched on, as the README tells an operator."""
    tls = (
        "# LoadCredential=tls.",
        "# Environment=PGWS_CERTIFICATE_FILE=",
        "# Environment=PGWS_KEY",
    )
    lines = [line[2:] if line.startswith(tls) else line for line in unit_text.splitlines()]
    return "\n".join(lines) + "\n"


def own_as_service_user(path: Path, mode: int) -> None:
    os.chown(path, pwd.getpwnam(SERVICE_USER).pw_uid, grp.getgrnam(SERVICE_GROUP).gr_gid)
    path.chmod(mode)


class Host:
    """A root-only /etc/pgws and a systemd-like credentials directory, removed afterwards."""

    def __init__(self) -> None:
        self.etc = Path(tempfile.mkdtemp(prefix="pgws-etc-"))  # mode 700, like install -d -m 700
        self.run = Path(tempfile.mkdtemp(prefix="pgws-run-credentials-"))
        self.run.chmod(0o755)  # like /run/credentials: anyone may enter, the unit's folder not

    def install_env(self, dsn: str, *, secret: str = SECRET) -> None:
        """`install -m 600 sample-env /etc/pgws/pgws.env`, then edit it (settings added last)."""
        env = self.etc / "pgws.env"
        shutil.copyfile(SAMPLE_ENV, env)
        env.chmod(0o600)
        edits = {
            "PGWS_DB_URI": dsn,
            "PGWS_JWT_SECRET": secret,
            "PGWS_HOST": "127.0.0.1",
            "PGWS_PORT": "0",
            "PGWS_LISTEN_CHANNEL": channel_name(),
            "PGWS_RETRIES": "1",
        }
        with env.open("a") as file:
            file.writelines(f'export {key}="{value}"\n' for key, value in edits.items())

    def install_file(self, source: Path, name: str) -> None:
        target = self.etc / name
        shutil.copyfile(source, target)
        target.chmod(0o600)

    def load_credentials(self, settings: list[tuple[str, str]]) -> Path:
        """What systemd does for each LoadCredential=NAME:/etc/pgws/FILE before ExecStart."""
        directory = self.run / "pgws.service"
        directory.mkdir()
        for key, value in settings:
            if key != "LoadCredential":
                continue
            name, _, source = value.partition(":")
            assert source.startswith("/etc/pgws/"), value
            target = directory / name
            shutil.copyfile(self.etc / source.removeprefix("/etc/pgws/"), target)
            own_as_service_user(target, 0o400)
        own_as_service_user(directory, 0o500)
        return directory

    def cleanup(self) -> None:
        shutil.rmtree(self.etc, ignore_errors=True)
        shutil.rmtree(self.run, ignore_errors=True)


@pytest.fixture
def host() -> Iterator[Host]:
    made = Host()
    yield made
    made.cleanup()


def service_dsn(dsn: str) -> str:
    """The test database's URI naming its role: as `nobody`, libpq would log in as `nobody`."""
    info = conninfo_to_dict(dsn)
    info.setdefault("user", pwd.getpwuid(os.geteuid()).pw_name)
    return make_conninfo("", **info)


def pgws_runs_as_service_user() -> None:
    """Skip when this interpreter or checkout is out of the unprivileged user's reach."""
    result = subprocess.run(
        ["setpriv", f"--reuid={SERVICE_USER}", f"--regid={SERVICE_GROUP}", "--clear-groups",
         sys.executable, "-c", "import pgws"],
        capture_output=True, text=True, timeout=TIMEOUT, check=False, cwd="/",
    )  # fmt: skip
    if result.returncode != 0:
        pytest.skip(f"{SERVICE_USER} cannot run this venv's Python: {result.stderr.strip()}")


async def start_like_systemd(unit_text: str, host: Host) -> tuple[ServeProcess, int]:
    """Load the credentials, expand %d, run ExecStart in / as the service user; wait for start."""
    settings = service_settings(unit_text)
    credentials = host.load_credentials(settings)
    env = {
        "PATH": os.environ.get("PATH", ""),
        "CREDENTIALS_DIRECTORY": str(credentials),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    for key, value in settings:
        if key == "Environment":
            name, _, text = value.partition("=")
            env[name] = text.replace("%d", str(credentials))
    [command] = [shlex.split(value) for key, value in settings if key == "ExecStart"]
    assert command[0] == INSTALLED_PGWS
    command[0] = str(Path(sys.executable).parent / "pgws")
    process = await asyncio.create_subprocess_exec(
        "setpriv", f"--reuid={SERVICE_USER}", f"--regid={SERVICE_GROUP}", "--clear-groups",
        *command, env=env, cwd="/", stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    serving = ServeProcess(process)
    try:
        event = await serving.wait_for_event("server_started")
    except BaseException:
        await serving.kill()
        raise
    return serving, int(event["port"])


def process_uid(pid: int) -> int:
    """The real uid of a running process (setpriv execs pgws in the same pid)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


async def get_health(port: int, tls: ssl.SSLContext | None = None) -> bytes:
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=tls, server_hostname="localhost" if tls else None
        )
        writer.write(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await writer.drain()
        raw = await reader.read()
        writer.close()
    return raw.split(b"\r\n", 1)[0]


async def round_trip(url: str, **kwargs: Any) -> None:
    """An rw socket gets its own message back through the database."""
    chat = channel_name()
    async with connect(f"{url}/{chat}/{make_token({'mode': 'rw'})}", open_timeout=TIMEOUT,
                       **kwargs) as ws:  # fmt: skip
        await ws.send("via systemd")
        envelope = await recv_json(ws)
    assert envelope["channel"] == chat
    assert envelope["payload"] == "via systemd"


@needs_root_and_setpriv
async def test_readme_recipe_serves_as_an_unprivileged_user(dsn: str, host: Host) -> None:
    """/etc/pgws/pgws.env (root, 600, in a 700 folder) reaches pgws as a credential: it serves."""
    pgws_runs_as_service_user()
    host.install_env(service_dsn(dsn))
    serving, port = await start_like_systemd(UNIT.read_text(), host)
    try:
        assert process_uid(serving.process.pid) == pwd.getpwnam(SERVICE_USER).pw_uid
        assert await get_health(port) == b"HTTP/1.1 200 OK"
        await round_trip(f"ws://127.0.0.1:{port}")
    finally:
        await serving.kill()


@needs_root_and_setpriv
async def test_readme_recipe_with_tls_serves_wss_as_an_unprivileged_user(
    dsn: str,
    host: Host,
    pki: Pki,  # noqa: F811
) -> None:
    """The unit's TLS lines switched on: cert and key from /etc/pgws (root, 600) serve wss://."""
    pgws_runs_as_service_user()
    host.install_env(service_dsn(dsn))
    host.install_file(pki.leaf, "cert.pem")
    host.install_file(pki.leaf_key, "key.pem")
    serving, port = await start_like_systemd(with_tls_enabled(UNIT.read_text()), host)
    try:
        assert await get_health(port, client_context(pki)) == b"HTTP/1.1 200 OK"
        await round_trip(f"wss://localhost:{port}", ssl=client_context(pki))
    finally:
        await serving.kill()


@needs_root_and_setpriv
async def test_readme_recipe_with_an_at_file_secret_credential(dsn: str, host: Host) -> None:
    """LoadCredential=jwt plus Environment=PGWS_JWT_SECRET=@%d/jwt, as the README says: the
    secret in the credential (not the env file's) verifies the tokens."""
    pgws_runs_as_service_user()
    host.install_env(service_dsn(dsn), secret="not-the-secret-the-tokens-are-signed-with")
    (host.etc / "jwt").write_text(SECRET + "\n")
    (host.etc / "jwt").chmod(0o600)
    credential = "LoadCredential=env:/etc/pgws/pgws.env\n"
    unit = UNIT.read_text()
    assert credential in unit
    unit = unit.replace(
        credential,
        credential + "LoadCredential=jwt:/etc/pgws/jwt\nEnvironment=PGWS_JWT_SECRET=@%d/jwt\n",
    )
    serving, port = await start_like_systemd(unit, host)
    try:
        await round_trip(f"ws://127.0.0.1:{port}")
    finally:
        await serving.kill()


def pgws_command(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pgws", *args],
        env={"PATH": os.environ.get("PATH", ""), **env},
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip


@pytest.mark.nodb
def test_env_credential_is_read_when_no_env_file_is_given(tmp_path: Path) -> None:
    """CREDENTIALS_DIRECTORY/env is the env file by default: its bad PGWS_PORT is the error."""
    (tmp_path / "env").write_text(
        f"export PGWS_DB_URI=postgresql://127.0.0.1:1/x\nexport PGWS_JWT_SECRET={SECRET}\n"
        "export PGWS_PORT=from-credential\n"
    )
    result = pgws_command("serve", env={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert result.returncode == EX_CONFIG, result.stderr
    assert result.stderr == "Error: PGWS_PORT: expected an integer, got 'from-credential'\n"


@pytest.mark.nodb
def test_env_file_option_wins_over_the_env_credential(tmp_path: Path) -> None:
    """--env-file given: the credential is not read (the explicit file is what was meant)."""
    (tmp_path / "env").write_text("PGWS_PORT=from-credential\n")
    chosen = tmp_path / "chosen.env"
    chosen.write_text(
        f"PGWS_DB_URI=postgresql://127.0.0.1:1/x\nPGWS_JWT_SECRET={SECRET}\nPGWS_PORT=chosen\n"
    )
    result = pgws_command(
        "serve", "--env-file", str(chosen), env={"CREDENTIALS_DIRECTORY": str(tmp_path)}
    )
    assert result.stderr == "Error: PGWS_PORT: expected an integer, got 'chosen'\n"


@pytest.mark.nodb
def test_credentials_directory_without_env_is_ignored(tmp_path: Path) -> None:
    """Other credentials only (no `env`): settings come from the environment alone."""
    (tmp_path / "tls.key").write_text("not used\n")
    result = pgws_command("serve", env={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert result.stderr == "Error: PGWS_DB_URI: must be set\n"


@pytest.mark.nodb
def test_sample_env_sets_no_relative_path() -> None:
    """An operator copies sample-env into /etc/pgws/pgws.env: under systemd, relative means /."""
    values = parse_env_file(SAMPLE_ENV)
    for name in ("PGWS_ROOT_PATH", "PGWS_CERTIFICATE_FILE", "PGWS_KEY_FILE"):
        if name in values:
            assert Path(values[name]).is_absolute(), (name, values[name])


@needs_root_and_setpriv
def test_the_old_recipe_cannot_read_its_env_file_as_the_service_user(host: Host) -> None:
    """Why credentials: `--env-file /etc/pgws/pgws.env` as the unprivileged user is refused (78)."""
    pgws_runs_as_service_user()
    host.install_env("postgresql://127.0.0.1:1/x")
    env_file = str(host.etc / "pgws.env")
    result = subprocess.run(
        ["setpriv", f"--reuid={SERVICE_USER}", f"--regid={SERVICE_GROUP}", "--clear-groups",
         str(Path(sys.executable).parent / "pgws"), "serve", "--env-file", env_file],
        capture_output=True, text=True, timeout=TIMEOUT, check=False, cwd="/",
    )  # fmt: skip
    assert result.returncode == EX_CONFIG
    assert result.stderr.endswith("Permission denied\n"), result.stderr
