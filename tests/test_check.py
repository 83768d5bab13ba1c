"""`pgws check`: serve's start-up checks as a report, with serve's exit codes (issue 13 item 6)."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.conftest import SECRET, TIMEOUT, channel_name, run_pgws

PASSWORD = "hunter2-check"


def check(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`pgws check ARGS` with only PATH and `env`, bounded."""
    return run_pgws("check", *args, env=env)


async def test_a_good_setup_reports_every_check_and_exits_0(dsn: str, tmp_path: Path) -> None:
    env_file = tmp_path / "env"
    env_file.write_text(f"PGWS_DB_URI={dsn}\nPGWS_JWT_SECRET={SECRET}\nPGWS_MAX_CONECTIONS=5\n")
    result = await asyncio.to_thread(check, "--env-file", str(env_file))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[1] for line in lines] == [
        "settings", "settings", "jwt", "tls", "database", "listen", "notify",
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
