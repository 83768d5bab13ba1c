"""How pgws connects: one client encoding whatever the role says, and start-up errors that no
retry can fix (a mistyped URI, an unknown database) stop at once with one clean line."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from dev.devdb import ThrowawayPostgres
from tests.conftest import (
    LOG_LINES,
    TIMEOUT,
    Running,
    StartGateway,
    channel_name,
    http_get,
    make_token,
    recv_json,
    run_pgws,
    subscribed,
)

SECRET = "reallyreallyreallyreallyverysafe-test-secret"
PASSWORD = "S3cretPW"
EX_CONFIG = 78
EX_UNAVAILABLE = 69
# What pgws gives each connection attempt when the URI sets no connect_timeout.
CONNECT_TIMEOUT = 10


def serve(db_uri: str, retries: int = 5) -> subprocess.CompletedProcess[str]:
    """`pgws serve` with only this database URI and a secret, bounded."""
    env = {"PGWS_DB_URI": db_uri, "PGWS_JWT_SECRET": SECRET, "PGWS_PORT": "0"}
    env["PGWS_RETRIES"] = str(retries)
    return run_pgws("serve", env=env, timeout=TIMEOUT + CONNECT_TIMEOUT * retries)


@pytest.mark.nodb
@pytest.mark.parametrize(
    "db_uri",
    [
        f"postgress://app:{PASSWORD}@localhost/db",
        f"postgresql://app:{PASSWORD}@localhost:notaport/db",
        f"host=localhost password={PASSWORD} nosuchoption=1",
        f"mysql://app:{PASSWORD}@localhost/db",
    ],
)
def test_a_mistyped_database_uri_is_one_line_exit_78_without_the_password(db_uri: str) -> None:
    """Before: exit 1 with a 60-line traceback quoting the URI, password included."""
    result = serve(db_uri)
    assert result.returncode == EX_CONFIG, result.stderr
    assert "Traceback" not in result.stderr
    assert PASSWORD not in result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: PGWS_DB_URI: ")


def test_an_unknown_database_stops_at_once_with_exit_78_naming_it(dsn: str) -> None:
    """Retrying cannot create a database: exit 78 on the first attempt, host and name shown."""
    missing = f"pgws_missing_{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    result = serve(make_conninfo(dsn, dbname=missing, password=PASSWORD))
    elapsed = time.monotonic() - started
    assert result.returncode == EX_CONFIG, result.stderr
    assert "Traceback" not in result.stderr
    assert PASSWORD not in result.stdout + result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1, result.stderr
    assert missing in error[0]
    assert "database_unreachable" not in result.stderr  # no retry was made
    assert elapsed < TIMEOUT


def only_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed start-up prints, after checking it is clean."""
    assert "Traceback" not in result.stderr
    assert PASSWORD not in result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


async def test_a_wrong_password_stops_at_once_with_exit_78(cluster: ThrowawayPostgres) -> None:
    """Before: retried like an outage and exit 69, which the unit restarts forever."""
    role = f"pgws_pw_{uuid.uuid4().hex[:8]}"
    hba = cluster.datadir / "pg_hba.conf"
    rules = hba.read_text()
    hba.write_text(f"host all {role} 127.0.0.1/32 scram-sha-256\n{rules}")
    async with await psycopg.AsyncConnection.connect(cluster.uri, autocommit=True) as admin:
        await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'the-right-one'")
        await admin.execute("SELECT pg_reload_conf()")
    uri = make_conninfo(cluster.uri, user=role, password=PASSWORD)
    started = time.monotonic()
    result = await asyncio.to_thread(serve, uri)
    elapsed = time.monotonic() - started
    assert result.returncode == EX_CONFIG, result.stderr
    line = only_line(result)
    assert line.startswith("Error: PGWS_DB_URI: ")
    assert f"127.0.0.1:{cluster.port}/postgres" in line
    assert "password authentication failed" in line
    assert elapsed < TIMEOUT  # the first attempt, not five with back-off


@pytest.mark.nodb
def test_a_database_that_accepts_and_never_answers_is_bounded_and_named() -> None:
    """Before: 66 s for one attempt, and a line that did not say which database it was."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never says a word
        port = silent.getsockname()[1]
        started = time.monotonic()
        result = serve(f"postgresql://app:{PASSWORD}@127.0.0.1:{port}/appdb", retries=1)
        elapsed = time.monotonic() - started
    assert result.returncode == EX_UNAVAILABLE, result.stderr
    line = only_line(result)
    assert f"at 127.0.0.1:{port}/appdb after 1 attempt: connection timeout expired" in line
    assert elapsed < CONNECT_TIMEOUT + TIMEOUT


async def test_a_role_that_may_not_log_in_stops_at_once_with_exit_78(
    dsn: str, db: psycopg.AsyncConnection[Any]
) -> None:
    """NOLOGIN is a setting, not an outage: no retries."""
    role = f"pgws_nologin_{uuid.uuid4().hex[:8]}"
    await db.execute(f"CREATE ROLE {role} NOLOGIN")
    try:
        result = await asyncio.to_thread(serve, make_conninfo(dsn, user=role, password=PASSWORD))
    finally:
        await db.execute(f"DROP ROLE {role}")
    assert result.returncode == EX_CONFIG, result.stderr
    assert "is not permitted to log in" in only_line(result)


@pytest.fixture
async def latin1_dsn(dsn: str, db: psycopg.AsyncConnection[Any]) -> AsyncIterator[str]:
    """A role whose sessions default to client_encoding LATIN1, as an operator may have set."""
    role = f"pgws_latin1_{uuid.uuid4().hex[:8]}"
    await db.execute(f"CREATE ROLE {role} LOGIN")
    await db.execute(f"ALTER ROLE {role} SET client_encoding = 'LATIN1'")
    try:
        yield make_conninfo(dsn, user=role)
    finally:
        await db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,)
        )
        await db.execute(f"DROP ROLE IF EXISTS {role}")


async def test_a_latin1_role_cannot_break_the_listener_with_a_euro_sign(
    start_gateway: StartGateway, latin1_dsn: str
) -> None:
    """Before: the LISTEN connection (LATIN1) died on '€'; now every connection speaks UTF8."""
    running: Running = await start_gateway(db_uri=latin1_dsn, check_listener_interval=1.0)
    chat = channel_name()
    token = make_token({"mode": "rw", "channels": [chat]})
    async with running.connect(f"/{chat}/{token}") as ws:
        for text in ["prix: 5 €", "café ✓ 😀"]:
            await ws.send(text)
            envelope = await recv_json(ws)
            assert envelope["payload"] == text
    assert running.gateway.is_ready()
    assert json.dumps(envelope)  # a plain, decodable envelope


@pytest.fixture
async def sql_ascii_dsn(dsn: str, db: psycopg.AsyncConnection[Any]) -> AsyncIterator[str]:
    """A database created with SQL_ASCII: it stores and NOTIFYs whatever bytes it is given."""
    name = f"pgws_sql_ascii_{uuid.uuid4().hex[:8]}"
    await db.execute(
        f"CREATE DATABASE {name} ENCODING 'SQL_ASCII' TEMPLATE template0"
        " LC_COLLATE 'C' LC_CTYPE 'C'"
    )
    try:
        yield make_conninfo(dsn, dbname=name)
    finally:
        await db.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def notify_bytes(dsn: str, channel: str, payload: bytes) -> None:
    """NOTIFY exactly these bytes (SQL_ASCII passes them through unchecked)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as producer:
        await producer.execute(
            "SELECT pg_notify(%s, convert_from(%s, 'SQL_ASCII'))", (channel, payload)
        )


@pytest.mark.parametrize("interval", [None, 1.0], ids=["self-healing off", "self-healing on"])
async def test_a_notification_that_is_not_utf8_is_counted_and_skipped(
    sql_ascii_dsn: str, start_gateway: StartGateway, interval: float | None
) -> None:
    """Before: one LATIN1 byte on a SQL_ASCII database ended the LISTEN connection (exit 1 with a
    traceback, or a reconnect losing what came meanwhile). Now: counted, logged once, skipped."""
    running: Running = await start_gateway(db_uri=sql_ascii_dsn, check_listener_interval=interval)
    chat = channel_name()
    listen = running.config.listen_channel
    log_start = len(LOG_LINES.getvalue())
    async with running.connect(f"/{chat}/{make_token({'mode': 'rw', 'channels': [chat]})}") as ws:
        await subscribed(running, chat)
        for _ in range(2):
            await notify_bytes(sql_ascii_dsn, listen, b"caf\xe9 from a LATIN1 producer")
        await ws.send("prix: 5 € after the bad ones")  # UTF-8 through pgws itself still works
        assert (await recv_json(ws))["payload"] == "prix: 5 € after the bad ones"
    listener = running.gateway.listener
    assert (listener.undecodable, listener.reconnects) == (2, 0)
    assert running.gateway.is_ready()
    logged = LOG_LINES.getvalue()[log_start:]
    assert logged.count("notification_undecodable") == 1
    assert "caf" not in logged  # the payload itself is not logged
    status, _, body = await http_get(running, "/metrics")
    assert status == 200
    assert "pgws_notifications_undecodable_total 2.0" in body.decode()
