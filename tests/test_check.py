"""`pgws check`: serve's start-up checks as a report, with serve's exit codes (issue 13 item 6)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from psycopg import sql

from pgws.check import certificate_dates
from pgws.config import Config
from pgws.parsers import ChannelSet
from tests.conftest import SECRET, TIMEOUT, channel_name, run_pgws
from tests.jwks_provider import Provider, running_provider, signing_key

PASSWORD = "hunter2-check"


def check(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`pgws check ARGS` with only PATH and `env`, bounded."""
    return run_pgws("check", *args, env=env)


async def test_a_good_setup_reports_every_check_and_exits_0(dsn: str, tmp_path: Path) -> None:
    env_file = tmp_path / "env"
    env_file.write_text(
        f"PGWS_DB_URI={dsn}\nPGWS_JWT_SECRET={SECRET}\nPGWS_MAX_CONECTIONS=5\n"
        "PGWS_PORT=0\nPGWS_POOL_SIZE=1\n"
    )
    result = await asyncio.to_thread(check, "--env-file", str(env_file))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[1] for line in lines] == [
        "settings", "settings", "jwt", "tls", "port", "database", "listen", "notify",
        "connections", "durable",
    ]  # fmt: skip
    assert lines[1].startswith("warn")
    assert "did you mean PGWS_MAX_CONNECTIONS?" in lines[1]
    assert all(line.startswith("ok") for line in lines[2:])
    assert SECRET not in result.stdout + result.stderr


async def test_its_notify_is_rolled_back_so_no_running_pgws_sees_it(
    dsn: str, db: psycopg.AsyncConnection[Any]
) -> None:
    """The NOTIFY check runs in a transaction that is rolled back: readers get nothing."""
    channel = channel_name()
    await db.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
    result = await asyncio.to_thread(
        check, PGWS_DB_URI=dsn, PGWS_JWT_SECRET=SECRET, PGWS_LISTEN_CHANNEL=channel
    )
    assert result.returncode == 0, result.stdout + result.stderr
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as producer:
        await producer.execute("SELECT pg_notify(%s, 'after the check')", (channel,))
    async with asyncio.timeout(TIMEOUT):
        first = await anext(aiter(db.notifies()))
    assert first.payload == "after the check"  # the check's own '' never arrived


@pytest.mark.nodb
@pytest.mark.parametrize(
    ("env", "code", "start"),
    [
        ({"PGWS_PORT": "abc"}, 78, "Error: PGWS_PORT: expected an integer, got 'abc'"),
        ({"PGWS_JWT_SECRET": '{"kty": "oct",'}, 78, "Error: PGWS_JWT_SECRET: "),
        ({"PGWS_CERTIFICATE_FILE": "/etc/hostname", "PGWS_KEY_FILE": "/etc/hostname"}, 78,
         "Error: PGWS_CERTIFICATE_FILE: "),
        ({}, 69, "Error: cannot connect to the database at 127.0.0.1:1/x after 1 attempt:"),
    ],
)  # fmt: skip
def test_what_would_stop_serve_stops_check_with_the_same_code(
    env: dict[str, str], code: int, start: str
) -> None:
    base = {"PGWS_DB_URI": f"postgresql://u:{PASSWORD}@127.0.0.1:1/x", "PGWS_JWT_SECRET": SECRET}
    result = check(**{**base, **env})
    assert result.returncode == code, result.stdout + result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1].startswith(start), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert PASSWORD not in result.stderr
    assert SECRET not in result.stderr


# --- JWKS, certificate dates, port, connections, durable schema (issue 13 items 1 and 6) ------


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[Provider]:
    with running_provider(tmp_path) as running:
        yield running


def jwks_env(dsn: str, url: str, ca_file: Path, **extra: str) -> dict[str, str]:
    return {
        "PGWS_DB_URI": dsn,
        "PGWS_JWT_JWKS_URL": url,
        "PGWS_JWT_JWKS_CA_FILE": str(ca_file),
        "PGWS_PORT": "0",
        "PGWS_POOL_SIZE": "1",
        **extra,
    }


async def test_the_jwks_is_fetched_and_its_usable_keys_reported(
    dsn: str, provider: Provider, tmp_path: Path
) -> None:
    provider.serve(signing_key("idp-1"), signing_key("idp-2", "ES256"))
    provider.keys.append({"kty": "RSA", "use": "enc", "kid": "enc-1"})
    cache = tmp_path / "jwks.json"
    env = jwks_env(dsn, provider.url, provider.ca_file, PGWS_JWT_JWKS_CACHE=str(cache))
    result = await asyncio.to_thread(check, **env)
    assert result.returncode == 0, result.stdout + result.stderr
    line = next(line for line in result.stdout.splitlines() if line.split()[1] == "jwks")
    assert line == (
        f"ok    jwks        {provider.url}: 2 usable keys (ES256, RS256; kids idp-1, idp-2),"
        " 1 skipped (key 2: not a signature key (use is not sig))"
    )
    assert provider.count == 1
    assert cache.exists()  # written as serve writes it


async def test_with_the_provider_down_check_exits_78_or_warns_from_the_cache(
    dsn: str, tmp_path: Path
) -> None:
    cache = tmp_path / "jwks.json"
    with running_provider(tmp_path) as provider:
        provider.serve(signing_key("idp-1"))
        url, ca_file = provider.url, provider.ca_file
        first = await asyncio.to_thread(check, **jwks_env(dsn, url, ca_file))
        assert first.returncode == 0, first.stdout + first.stderr
    down = await asyncio.to_thread(check, **jwks_env(dsn, url, ca_file))
    assert down.returncode == 78
    assert down.stdout == ""
    assert down.stderr == f"Error: PGWS_JWT_JWKS_URL: cannot fetch {url}: Connection refused\n"
    with running_provider(tmp_path) as provider:
        provider.serve(signing_key("idp-1"))
        cached = jwks_env(dsn, provider.url, provider.ca_file, PGWS_JWT_JWKS_CACHE=str(cache))
        assert (await asyncio.to_thread(check, **cached)).returncode == 0  # writes the cache
        cached["PGWS_JWT_JWKS_URL"] = url  # the port nothing listens on any more
    result = await asyncio.to_thread(check, **cached)
    assert result.returncode == 0, result.stdout + result.stderr
    line = next(line for line in result.stdout.splitlines() if line.split()[1] == "jwks")
    assert line.startswith(f"warn  jwks        {url} unreachable (cannot fetch {url}: Connection")
    assert "serving would start from the copy cached" in line


@pytest.mark.nodb
def test_certificate_dates_fail_outside_them_and_warn_near_the_end(tmp_path: Path) -> None:
    pem = _certificate_valid(tmp_path, days=30)
    start = datetime.datetime.now(datetime.UTC)
    assert certificate_dates(pem, start).status == "ok"
    assert certificate_dates(pem, start + datetime.timedelta(days=20)).status == "warn"
    expired = certificate_dates(pem, start + datetime.timedelta(days=31))
    assert expired.status == "FAIL"
    assert expired.detail.startswith("certificate expired ")
    early = certificate_dates(pem, start - datetime.timedelta(days=2))
    assert early.status == "FAIL"
    assert early.detail.startswith("certificate not valid before ")


async def test_an_expired_certificate_makes_check_exit_1(dsn: str, tmp_path: Path) -> None:
    pem = _certificate_valid(tmp_path, days=-1)
    env = {
        "PGWS_DB_URI": dsn,
        "PGWS_JWT_SECRET": SECRET,
        "PGWS_PORT": "0",
        "PGWS_CERTIFICATE_FILE": str(pem),
        "PGWS_KEY_FILE": str(tmp_path / "key.pem"),
    }
    result = await asyncio.to_thread(check, **env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL  tls         certificate expired " in result.stdout


async def test_a_port_in_use_is_a_warning(dsn: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"PGWS_DB_URI": dsn, "PGWS_JWT_SECRET": SECRET, "PGWS_HOST": "127.0.0.1",
               "PGWS_PORT": str(port)}  # fmt: skip
        result = await asyncio.to_thread(check, **env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"warn  port        port {port} is already in use on 127.0.0.1" in result.stdout


async def test_too_few_database_connections_for_pool_and_workers_is_a_warning(dsn: str) -> None:
    env = {"PGWS_DB_URI": dsn, "PGWS_JWT_SECRET": SECRET, "PGWS_PORT": "0",
           "PGWS_POOL_SIZE": "1000", "PGWS_WORKERS": "8"}  # fmt: skip
    result = await asyncio.to_thread(check, **env)
    assert result.returncode == 0, result.stdout + result.stderr
    line = next(line for line in result.stdout.splitlines() if line.split()[1] == "connections")
    assert line.startswith("warn  connections pgws needs 8008 (1 LISTEN + 1000 NOTIFY per process")


async def test_the_durable_schema_is_reported_current_after_migrate(dsn: str) -> None:
    migrated = await asyncio.to_thread(run_pgws, "migrate", env={"PGWS_DB_URI": dsn})
    assert migrated.returncode == 0, migrated.stderr
    result = await asyncio.to_thread(
        check, PGWS_DB_URI=dsn, PGWS_JWT_SECRET=SECRET, PGWS_PORT="0", PGWS_POOL_SIZE="1"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok    durable     schema pgws at version 1, current" in result.stdout.splitlines()


async def test_an_older_durable_schema_asks_for_pgws_migrate(dsn: str) -> None:
    """In a transaction rolled back at the end: the database keeps its real schema."""
    from pgws.db.durable_schema import SCHEMA_VERSION
    from pgws.db.probe import _durable_schema

    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await conn.execute("CREATE SCHEMA IF NOT EXISTS pgws")
        await conn.execute("CREATE TABLE IF NOT EXISTS pgws.schema_version (version integer)")
        await conn.execute("DELETE FROM pgws.schema_version")
        await conn.execute("INSERT INTO pgws.schema_version VALUES (%s)", (SCHEMA_VERSION - 1,))
        off = Config(db_uri=dsn, jwt_secret=SECRET.encode())
        on = dataclasses.replace(off, durable=ChannelSet(every=True))
        kept = dataclasses.replace(on, durable_migrate=False)
        older = [await _durable_schema(conn, config) for config in (off, on, kept)]
        await conn.execute("UPDATE pgws.schema_version SET version = %s", (SCHEMA_VERSION + 1,))
        newer = [await _durable_schema(conn, config) for config in (off, on, kept)]
        await conn.rollback()
    # Durable channels off: reported; on: what would stop serve fails, what serve fixes passes.
    assert [finding[2] for finding in older] == ["warn", "ok", "FAIL"]
    assert older[0][1].endswith("run `pgws migrate`")
    assert "serve upgrades it" in older[1][1]
    assert [finding[2] for finding in newer] == ["warn", "FAIL", "FAIL"]
    assert all(finding[1].endswith("upgrade pgws") for finding in newer)


async def test_with_durable_channels_on_and_no_migration_a_missing_schema_fails_check(
    fresh_uri: str,
) -> None:
    """serve would exit 78 here (PGWS_DURABLE_MIGRATE=false, no schema): check says FAIL."""
    env = {"PGWS_DB_URI": fresh_uri, "PGWS_JWT_SECRET": SECRET, "PGWS_PORT": "0"}
    result = await asyncio.to_thread(
        check, **env, PGWS_POOL_SIZE="1", PGWS_DURABLE="true", PGWS_DURABLE_MIGRATE="false"
    )
    assert result.returncode == 1, result.stdout + result.stderr
    line = next(line for line in result.stdout.splitlines() if line.split()[1] == "durable")
    assert line.startswith("FAIL")
    assert "run `pgws migrate`" in line
    migrating = await asyncio.to_thread(check, **env, PGWS_POOL_SIZE="1", PGWS_DURABLE="true")
    assert migrating.returncode == 0, migrating.stdout + migrating.stderr


def _certificate_valid(folder: Path, *, days: int) -> Path:
    """A self-signed certificate from now-1h to now+`days` (and its key, key.pem, beside it)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(
            now - datetime.timedelta(hours=1) + min(days, 0) * datetime.timedelta(days=1)
        )
        .not_valid_after(now + datetime.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    path = folder / "cert.pem"
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path
