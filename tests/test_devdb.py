"""Tests for dev.devdb against real PostgreSQL clusters started and stopped here."""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import LiteralString

import psycopg
import pytest

from dev.devdb import ThrowawayPostgres, find_bindir
from tests.conftest import TIMEOUT


def query_one(uri: str, sql: LiteralString) -> object:
    """Run sql on a fresh connection and return the first column of its first row."""
    with psycopg.connect(uri, autocommit=True, connect_timeout=int(TIMEOUT)) as conn:
        row = conn.execute(sql).fetchone()
    assert row is not None
    return row[0]


def assert_refused(uri: str) -> None:
    """Assert that nothing accepts connections at uri."""
    with pytest.raises(psycopg.OperationalError, match=r"(?i)connection refused"):
        psycopg.connect(uri, connect_timeout=int(TIMEOUT)).close()


def read_lines(stream: int, count: int, timeout: float) -> list[str]:
    """Read count complete lines from a pipe's file descriptor, failing after timeout seconds."""
    deadline = time.monotonic() + timeout
    data = b""
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        while data.count(b"\n") < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                pytest.fail(f"no {count} lines within {timeout:g} s, got {data!r}")
            chunk = os.read(stream, 4096)
            if not chunk:
                pytest.fail(f"pipe closed after {data!r}")
            data += chunk
    return data.decode().splitlines()[:count]


@pytest.fixture
def cluster() -> Iterator[ThrowawayPostgres]:
    """A started cluster in a temporary folder, stopped and removed afterwards."""
    with ThrowawayPostgres() as pg:
        yield pg


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """An empty folder under /tmp that postgres can enter, unlike pytest's tmp_path as root."""
    folder = Path(tempfile.mkdtemp(prefix="pgws-test-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def test_find_bindir_returns_a_folder_with_the_server_binaries() -> None:
    """find_bindir() names a folder that holds initdb, pg_ctl and postgres."""
    bindir = find_bindir()
    assert all((bindir / name).is_file() for name in ("initdb", "pg_ctl", "postgres"))


def test_started_cluster_answers_a_query_on_its_uri(cluster: ThrowawayPostgres) -> None:
    """A started cluster answers queries at its uri, on its port, with fsync off."""
    assert cluster.uri == f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres"
    assert query_one(cluster.uri, "SELECT 1") == 1
    assert query_one(cluster.uri, "SHOW fsync") == "off"
    assert cluster.postmaster_pid() is not None


def test_restart_keeps_the_port_and_the_data(cluster: ThrowawayPostgres) -> None:
    """An immediate restart comes back on the same port with synchronously committed rows."""
    port, pid = cluster.port, cluster.postmaster_pid()
    with psycopg.connect(cluster.uri, autocommit=True) as conn:
        # The cluster commits asynchronously; an immediate stop may lose what is not flushed.
        conn.execute("SET synchronous_commit TO on")
        conn.execute("CREATE TABLE kept (x int)")
        conn.execute("INSERT INTO kept VALUES (42)")

    cluster.restart(mode="immediate")

    assert cluster.port == port
    assert cluster.postmaster_pid() not in (None, pid)
    assert query_one(cluster.uri, "SELECT x FROM kept") == 42


def test_stopped_cluster_refuses_connections(cluster: ThrowawayPostgres) -> None:
    """After stop() the port refuses connections, and a second stop() is a no-op."""
    cluster.stop()

    assert cluster.postmaster_pid() is None
    assert_refused(cluster.uri)
    cluster.stop()


def test_settings_override_is_visible_in_show() -> None:
    """A settings entry overrides the default and shows up in SHOW."""
    with ThrowawayPostgres(settings={"max_connections": "42", "work_mem": "7MB"}) as pg:
        assert query_one(pg.uri, "SHOW max_connections") == "42"
        assert query_one(pg.uri, "SHOW work_mem") == "7MB"


def test_two_clusters_run_at_once_on_different_ports() -> None:
    """Two clusters started side by side get different ports and both answer."""
    with ThrowawayPostgres() as first, ThrowawayPostgres() as second:
        assert first.port != second.port
        assert query_one(first.uri, "SELECT 1") == query_one(second.uri, "SELECT 1") == 1


def test_taken_port_is_replaced_by_a_free_one_on_first_start() -> None:
    """If another process takes the picked port before the first start, another one is used."""
    pg = ThrowawayPostgres()
    try:
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", pg.port))
            squatter.listen()
            taken = pg.port
            pg.start()
        assert pg.port != taken
        assert query_one(pg.uri, "SELECT 1") == 1
    finally:
        pg.cleanup()


def test_failed_start_raises_with_the_log_and_leaves_nothing_running() -> None:
    """A start that fails raises RuntimeError quoting the server log, and no server is left."""
    pg = ThrowawayPostgres(settings={"shared_buffers": "plenty"})
    try:
        with pytest.raises(RuntimeError, match='invalid value for parameter "shared_buffers"'):
            pg.start()
        assert pg.postmaster_pid() is None
        assert_refused(pg.uri)
    finally:
        pg.cleanup()
    assert not pg.datadir.exists()


def test_given_datadir_is_kept_and_reused(open_folder: Path) -> None:
    """A given data directory survives cleanup() and a new cluster there sees the old data."""
    datadir = open_folder / "pg"
    with ThrowawayPostgres(datadir) as pg, psycopg.connect(pg.uri, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept AS SELECT 7 AS x")
    assert (datadir / "PG_VERSION").is_file()

    with ThrowawayPostgres(datadir) as pg:
        assert query_one(pg.uri, "SELECT x FROM kept") == 7


ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="only root runs postgres as another user")


@ROOT_ONLY
def test_empty_datadir_out_of_reach_becomes_temporary_as_root(tmp_path: Path) -> None:
    """As root, an empty datadir postgres cannot reach gives way to a temporary folder."""
    tmp_path.chmod(0o700)
    with ThrowawayPostgres(tmp_path / "pg") as pg:
        assert pg.temporary
        assert tmp_path not in pg.datadir.parents
        assert query_one(pg.uri, "SELECT 1") == 1
    assert not pg.datadir.exists()


@ROOT_ONLY
def test_datadir_out_of_reach_with_files_is_refused_as_root(tmp_path: Path) -> None:
    """As root, a datadir postgres cannot reach that already holds files is refused."""
    tmp_path.chmod(0o700)
    (tmp_path / "pg").mkdir()
    (tmp_path / "pg" / "PG_VERSION").write_text("16\n")
    with pytest.raises(RuntimeError, match="cannot enter"):
        ThrowawayPostgres(tmp_path / "pg")


def test_module_prints_the_uri_and_stops_on_sigterm() -> None:
    """python -m dev.devdb prints a working URI, then stops the server and exits 0 on SIGTERM."""
    with subprocess.Popen(
        [sys.executable, "-m", "dev.devdb"],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        try:
            assert proc.stdout is not None
            lines = read_lines(proc.stdout.fileno(), 2, TIMEOUT)
            name, _, uri = lines[0].partition("=")
            assert name == "PGWS_TEST_DB_URI"
            assert lines[1] == f"PGWS_DB_URI={uri}"
            assert query_one(uri, "SELECT 1") == 1

            proc.send_signal(signal.SIGTERM)

            _, stderr = proc.communicate(timeout=TIMEOUT)
            assert proc.returncode == 0, stderr
            assert_refused(uri)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(TIMEOUT)
