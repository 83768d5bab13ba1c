"""A throwaway PostgreSQL cluster for ``make run``, the test suite and the benchmarks.

The cluster lives in one folder (its data directory), listens on 127.0.0.1 with trust
authentication and trades durability for speed (fsync, synchronous_commit and full_page_writes
are off). Settings are written to ``pgws.conf`` in the data directory on every start and
included from ``postgresql.conf``, so no value passes through pg_ctl's shell command line and
``pg_settings.sourcefile`` says where each one came from.

Running as root: initdb and postgres refuse to, so every PostgreSQL command runs as an
unprivileged system user, ``postgres`` if it exists, else ``pgws`` (created once with ``useradd
--system``). That user owns the data directory and must be able to enter every folder above it
for as long as the server runs, since postgres opens files such as global/pg_control by absolute
path (a checkpoint PANICs otherwise). Folders are never opened up with chmod: pytest, for one,
closes ``/tmp/pytest-of-root`` again (mode 700) whenever any session starts, which would take a
running cluster down. Instead, a temporary data directory comes from ``tempfile.mkdtemp()``
under the first of $TMPDIR, /tmp and /var/tmp that the user can enter, and so does the cluster
for a given data directory that the user cannot reach, if that folder is empty or missing (a
pytest tmp_path, say): such a cluster is temporary (``ThrowawayPostgres.temporary``), and
``ThrowawayPostgres.datadir`` says where it lives. A given folder out of reach that already
holds files is refused.

``python -m dev.devdb [--dir PATH] [--port N]`` starts a cluster, prints ``PGWS_TEST_DB_URI``
and ``PGWS_DB_URI``, and stops it on SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Literal

INITDB_TIMEOUT = 120.0  # seconds; initdb writes ~40 MB and runs the bootstrap backend
START_TIMEOUT = 30  # seconds; pg_ctl -t takes whole seconds
STOP_TIMEOUT = 30
_TOOL_TIMEOUT = 10.0  # pg_config, useradd
_GRACE = 5.0  # beyond pg_ctl's own -t, before we give up on pg_ctl itself
_PORT_ATTEMPTS = 3  # a port picked by us can be taken by someone else before postgres binds it
_SOCKET_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes, NUL included
_LOG_TAIL_BYTES = 8192
_LOG_TAIL_LINES = 30
_CONF_NAME = "pgws.conf"
_LOG_NAME = "server.log"
_INCLUDE_LINE = f"include_if_exists = '{_CONF_NAME}'  # added by dev.devdb"
_FALLBACK_USER = "pgws"
_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_SERVER_BINARIES = ("initdb", "pg_ctl", "postgres")

DEFAULT_SETTINGS: Mapping[str, str] = {
    # A throwaway cluster never needs to survive a power cut, so skip every flush to disk.
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "listen_addresses": "127.0.0.1",
    # Benchmarks open hundreds of connections; the default of 100 would refuse them.
    "max_connections": "300",
}

StopMode = Literal["smart", "fast", "immediate"]


def find_bindir() -> Path:
    """Return the folder holding initdb, pg_ctl and postgres.

    pgserver's binaries come first when it is installed (the same PostgreSQL everywhere), then
    ``pg_config --bindir``, then the newest /usr/lib/postgresql/<version>/bin.
    """
    finders: tuple[Callable[[], Path | None], ...] = (
        _pgserver_bindir,
        _pg_config_bindir,
        _debian_bindir,
    )
    for finder in finders:
        bindir = finder()
        if bindir is not None and all((bindir / name).is_file() for name in _SERVER_BINARIES):
            return bindir
    raise RuntimeError(
        "no PostgreSQL server binaries found: install pgserver (pip install 'pgws[embedded]') "
        "or a PostgreSQL server package that provides initdb, pg_ctl and postgres"
    )


def _pgserver_bindir() -> Path | None:
    """Return pgserver's bin folder (its ``_commands.POSTGRES_BIN_PATH``) without importing it.

    Importing pgserver creates a runtime folder, registers an atexit hook and, without
    XDG_RUNTIME_DIR, emits a RuntimeDirWarning that pytest's filterwarnings=error turns into a
    failure; the binaries are all we need.
    """
    try:
        spec = importlib.util.find_spec("pgserver")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _pg_config_bindir() -> Path | None:
    """Return what ``pg_config --bindir`` answers, if pg_config is on PATH."""
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    try:
        result = _run([pg_config, "--bindir"], timeout=_TOOL_TIMEOUT)
    except RuntimeError:
        return None
    return Path(result.stdout.strip()) if result.returncode == 0 else None


def _debian_bindir() -> Path | None:
    """Return the newest /usr/lib/postgresql/<version>/bin (Debian and Ubuntu's layout)."""
    root = Path("/usr/lib/postgresql")
    if not root.is_dir():
        return None
    versions = [entry for entry in root.iterdir() if entry.name.isdigit()]
    if not versions:
        return None
    return max(versions, key=lambda entry: int(entry.name)) / "bin"


@dataclasses.dataclass(frozen=True)
class _Account:
    """The unprivileged user that runs PostgreSQL's commands when we are root."""

    name: str
    uid: int
    gid: int

    def closed_folder(self, folder: Path) -> Path | None:
        """Return the first of folder and the folders above it that this user may not enter.

        Folders that do not exist yet are skipped: we create them, with mode 755 under the
        usual umask.
        """
        for candidate in reversed([folder, *folder.parents]):
            try:
                info = candidate.stat()
            except FileNotFoundError:
                return None
            if info.st_uid == self.uid:
                bit = stat.S_IXUSR
            elif info.st_gid == self.gid:  # only the primary group: we pass extra_groups=[]
                bit = stat.S_IXGRP
            else:
                bit = stat.S_IXOTH
            if not info.st_mode & bit:
                return candidate
        return None


def _temporary_datadir(account: _Account | None) -> str:
    """Create an empty temporary folder that account (when we are root) can reach."""
    if account is None:
        return tempfile.mkdtemp(prefix="pgws-pg-")
    for base in (tempfile.gettempdir(), "/tmp", "/var/tmp"):  # noqa: S108  # mkdtemp below them
        if Path(base).is_dir() and account.closed_folder(Path(base)) is None:
            return tempfile.mkdtemp(prefix="pgws-pg-", dir=base)
    raise RuntimeError(f"no temporary folder that user {account.name!r} can enter")


@functools.cache
def _service_account() -> _Account | None:
    """Return the user to run PostgreSQL as, or None when we are not root.

    Creates the ``pgws`` system user when neither ``postgres`` nor ``pgws`` exists.
    """
    if os.geteuid() != 0:
        return None
    for name in ("postgres", _FALLBACK_USER):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return _Account(name, entry.pw_uid, entry.pw_gid)
    useradd = shutil.which("useradd")
    if useradd is None:
        raise RuntimeError("running as root, no 'postgres' user and no useradd to create one")
    result = _run(
        [useradd, "--system", "--user-group", "--no-create-home", _FALLBACK_USER],
        timeout=_TOOL_TIMEOUT,
    )
    try:  # a concurrent process may have created it first, so look rather than trust rc
        entry = pwd.getpwnam(_FALLBACK_USER)
    except KeyError:
        raise RuntimeError(f"useradd {_FALLBACK_USER} failed: {_output(result)}") from None
    return _Account(_FALLBACK_USER, entry.pw_uid, entry.pw_gid)


def _run(
    args: Sequence[str | Path],
    *,
    timeout: float,
    account: _Account | None = None,
    new_session: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run one command to completion within timeout seconds, as account when given."""
    argv = [str(arg) for arg in args]
    try:
        return subprocess.run(  # noqa: S603  # argv is built here from absolute paths, no shell
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd="/",  # the account may not be allowed into our working directory
            start_new_session=new_session,
            user=None if account is None else account.uid,
            group=None if account is None else account.gid,
            extra_groups=None if account is None else [],
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{Path(argv[0]).name}: no answer within {timeout:g} s") from None


def _output(result: subprocess.CompletedProcess[str]) -> str:
    """Return a finished command's stdout and stderr as one stripped text."""
    return f"{result.stdout}{result.stderr}".strip()


def _unreachable(account: _Account, datadir: Path, closed: Path) -> RuntimeError:
    """Return the error for a data directory below a folder that account may not enter."""
    mode = stat.S_IMODE(closed.stat().st_mode)
    return RuntimeError(
        f"{datadir}: user {account.name!r} cannot enter {closed} (mode {mode:o}); use an empty "
        "folder, datadir=None, or a folder that every user can enter"
    )


def _free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _quote(value: str) -> str:
    """Quote value as a postgresql.conf string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _socket_dir(datadir: Path) -> str:
    """Return datadir as the Unix socket folder, or "" (TCP only) when it cannot hold one.

    Deep pytest folders exceed the socket path limit, and postgres refuses to start when it
    can create none of the sockets it was asked for; a comma would split the list.
    """
    folder = str(datadir)
    fits = len(f"{folder}/.s.PGSQL.65535".encode()) <= _SOCKET_PATH_MAX
    return folder if fits and "," not in folder else ""


class _PortInUse(RuntimeError):
    """postgres could not bind its port; another process took it after we picked it."""


class ThrowawayPostgres:
    """A private PostgreSQL cluster in its own folder, listening on 127.0.0.1:<free port>.

    Authentication is trust and the superuser is ``postgres``. datadir None means a fresh
    temporary folder that cleanup() removes; a given datadir is kept, and reused when it already
    holds a cluster (as root, see the module docstring for one out of postgres's reach). port
    None means a free port chosen once and kept across restarts. With synchronous_commit off,
    an immediate stop can lose the last fraction of a second of commits; a session that must
    survive one sets synchronous_commit on.
    """

    def __init__(
        self,
        datadir: Path | None = None,
        *,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self._settings = dict(settings or {})
        for name in self._settings:
            if not _SETTING_NAME.fullmatch(name):
                raise ValueError(f"settings: not a parameter name: {name!r}")
            if name.lower() == "port":
                raise ValueError("settings: pass port=, so that uri matches")
        self._bindir = find_bindir()
        self._account = _service_account()
        self._datadir, self._temporary = self._choose_datadir(datadir)
        self._port = _free_port() if port is None else port
        self._may_pick_port = port is None  # only until the first successful start

    @property
    def datadir(self) -> Path:
        """The cluster's data directory."""
        return self._datadir

    @property
    def temporary(self) -> bool:
        """Whether cleanup() removes the data directory."""
        return self._temporary

    @property
    def logfile(self) -> Path:
        """The server log that pg_ctl -l appends to, inside the data directory."""
        return self._datadir / _LOG_NAME

    @property
    def port(self) -> int:
        """The TCP port on 127.0.0.1, the same across restarts."""
        return self._port

    @property
    def uri(self) -> str:
        """A libpq URI for the superuser on the ``postgres`` database."""
        return f"postgresql://postgres@127.0.0.1:{self._port}/postgres"

    def start(self) -> None:
        """Run initdb unless the data directory holds a cluster, then start and wait for it.

        Raises RuntimeError with the tail of the server log when the server does not come up,
        and then leaves no server running.
        """
        if (pid := self.postmaster_pid()) is not None:
            raise RuntimeError(f"{self._datadir}: a server already runs here (pid {pid})")
        self._check_reachable()  # before initdb creates anything
        if not (self._datadir / "PG_VERSION").is_file():
            self._initdb()
        attempts = _PORT_ATTEMPTS if self._may_pick_port else 1
        for attempt in range(1, attempts + 1):
            try:
                self._start_once()
                break
            except _PortInUse:
                if attempt == attempts:
                    raise
                self._port = _free_port()
        self._may_pick_port = False

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server with pg_ctl stop -m mode and wait; do nothing if it is not running."""
        if self.postmaster_pid() is None:
            return
        problem = self._pg_ctl("stop", "-m", mode, "-t", str(STOP_TIMEOUT))
        if problem is not None and self.postmaster_pid() is not None:
            raise RuntimeError(
                f"postgres in {self._datadir} did not stop ({mode}): {problem}{self._log_tail()}"
            )

    def restart(self, mode: Literal["fast", "immediate"] = "fast") -> None:
        """Stop the server with mode, then start it again on the same port."""
        self.stop(mode)
        self.start()

    def postmaster_pid(self) -> int | None:
        """Return the running postmaster's pid from postmaster.pid, or None when it is not up."""
        try:
            first_line = (self._datadir / "postmaster.pid").read_text().partition("\n")[0]
            pid = int(first_line)
        except (OSError, ValueError):  # no file, or caught while postgres writes it
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:  # stale file left by a crash
            return None
        except PermissionError:  # alive, but owned by another user
            pass
        return pid

    def cleanup(self) -> None:
        """Stop the server (fast, then by force) and remove a temporary data directory."""
        try:
            self.stop("fast")
        except RuntimeError:
            self._kill()
        if self._temporary:
            # A leftover folder under /tmp is harmless; raising here would hide the caller's
            # own error, since cleanup() mostly runs in finally blocks.
            shutil.rmtree(self._datadir, ignore_errors=True)

    def __enter__(self) -> ThrowawayPostgres:
        """Start the cluster; if that fails, clean up before raising."""
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop the cluster and remove a temporary data directory."""
        self.cleanup()

    def _choose_datadir(self, datadir: Path | None) -> tuple[Path, bool]:
        """Return the data directory to use, and whether it is temporary."""
        if datadir is None:
            return Path(_temporary_datadir(self._account)).resolve(), True
        given = Path(datadir).resolve()
        account = self._account
        closed = None if account is None else account.closed_folder(given.parent)
        if account is None or closed is None:
            return given, False
        if given.exists() and (not given.is_dir() or any(given.iterdir())):
            raise _unreachable(account, given, closed)  # its content cannot move
        return Path(_temporary_datadir(account)).resolve(), True

    def _initdb(self) -> None:
        """Create the cluster in the data directory, owned by the account that runs postgres."""
        self._datadir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self._account is not None:
            os.chown(self._datadir, self._account.uid, self._account.gid)
        result = self._pg(
            "initdb",
            f"--pgdata={self._datadir}",
            "--auth=trust",
            "--username=postgres",
            "--encoding=UTF8",
            "--locale=C",  # always available, unlike the caller's locale
            "--no-sync",
            "--no-instructions",
            timeout=INITDB_TIMEOUT,
        )
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed in {self._datadir}:\n{_output(result)}")

    def _start_once(self) -> None:
        """Write the settings and run pg_ctl start; on failure stop any leftover and raise."""
        self._write_settings()
        log_offset = self.logfile.stat().st_size if self.logfile.exists() else 0
        # A session of its own keeps the terminal's Ctrl-C away from postgres, so the process
        # that started it decides when it stops.
        problem = self._pg_ctl(
            "start", f"--log={self.logfile}", "-t", str(START_TIMEOUT), new_session=True
        )
        if problem is None:
            return
        self._kill()
        error = (
            _PortInUse if "Address already in use" in self._log_since(log_offset) else RuntimeError
        )
        raise error(
            f"postgres in {self._datadir} did not start on port {self._port}: {problem}"
            f"{self._log_tail()}"
        )

    def _kill(self) -> None:
        """Stop the server immediately, and SIGKILL the postmaster if even that fails."""
        if self.postmaster_pid() is None:
            return
        self._pg_ctl("stop", "-m", "immediate", "-t", str(STOP_TIMEOUT))
        if (pid := self.postmaster_pid()) is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _write_settings(self) -> None:
        """Write pgws.conf (defaults, then the caller's settings, then the port) and include it."""
        values = {
            **DEFAULT_SETTINGS,
            "unix_socket_directories": _socket_dir(self._datadir),
            **self._settings,
            "port": str(self._port),
        }
        conf = self._datadir / _CONF_NAME
        lines = [f"{name} = {_quote(value)}" for name, value in values.items()]
        conf.write_text("# rewritten by dev.devdb on every start\n" + "\n".join(lines) + "\n")
        if self._account is not None:
            os.chown(conf, self._account.uid, self._account.gid)
        main_conf = self._datadir / "postgresql.conf"
        if _INCLUDE_LINE not in main_conf.read_text():
            with main_conf.open("a") as file:
                file.write(f"\n{_INCLUDE_LINE}\n")

    def _pg_ctl(self, action: str, *args: str, new_session: bool = False) -> str | None:
        """Run pg_ctl action -w with args; return None on success, else what went wrong."""
        try:
            result = self._pg(
                "pg_ctl",
                action,
                f"--pgdata={self._datadir}",
                "-w",
                *args,
                timeout=max(START_TIMEOUT, STOP_TIMEOUT) + _GRACE,
                new_session=new_session,
            )
        except RuntimeError as exc:  # pg_ctl itself hung past its own -t
            return str(exc)
        return None if result.returncode == 0 else _output(result)

    def _pg(
        self, tool: str, *args: str, timeout: float, new_session: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run one of PostgreSQL's tools, as the service account when we are root."""
        self._check_reachable()
        return _run(
            [self._bindir / tool, *args],
            timeout=timeout,
            account=self._account,
            new_session=new_session,
        )

    def _check_reachable(self) -> None:
        """Raise unless the service account can enter every folder above the data directory."""
        if self._account is None:
            return
        closed = self._account.closed_folder(self._datadir.parent)
        if closed is not None:
            raise _unreachable(self._account, self._datadir, closed)

    def _log_since(self, offset: int) -> str:
        """Return what the server log gained after offset bytes."""
        try:
            with self.logfile.open("rb") as file:
                file.seek(offset)
                return file.read().decode(errors="replace")
        except OSError:
            return ""

    def _log_tail(self) -> str:
        """Return the last lines of the server log, formatted to end an error message."""
        try:
            with self.logfile.open("rb") as file:
                file.seek(max(0, file.seek(0, os.SEEK_END) - _LOG_TAIL_BYTES))
                text = file.read().decode(errors="replace")
        except OSError as exc:
            return f"\n(no server log: {exc.strerror})"
        lines = text.splitlines()[-_LOG_TAIL_LINES:]
        return f"\n--- last lines of {self.logfile} ---\n" + "\n".join(lines)


class _StopRequested(Exception):
    """SIGINT or SIGTERM arrived."""


def _request_stop(signum: int, frame: FrameType | None) -> None:
    """Signal handler: unwind main() to its cleanup, wherever it is waiting."""
    raise _StopRequested


def main(argv: Sequence[str] | None = None) -> int:
    """Start a cluster, print its URI, and stop it on SIGINT or SIGTERM; return the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m dev.devdb",
        description="Run a throwaway PostgreSQL on 127.0.0.1 until SIGINT or SIGTERM.",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        help="data directory to keep and reuse (default: a temporary one, removed on exit)",
    )
    parser.add_argument("--port", type=int, help="TCP port (default: a free one)")
    args = parser.parse_args(argv)
    # Installed before start so a signal during startup still stops whatever was started.
    previous = {sig: signal.signal(sig, _request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    cluster: ThrowawayPostgres | None = None
    try:
        cluster = ThrowawayPostgres(args.dir, port=args.port)
        if args.dir is not None and cluster.temporary:
            sys.stderr.write(
                f"Error: --dir {args.dir}: PostgreSQL's user cannot reach it, so nothing could"
                " be kept there; choose a folder that every user can enter\n"
            )
            return 1
        cluster.start()
        sys.stdout.write(f"PGWS_TEST_DB_URI={cluster.uri}\nPGWS_DB_URI={cluster.uri}\n")
        sys.stdout.flush()
        while True:
            signal.pause()
    except _StopRequested:
        return 0
    except RuntimeError as exc:
        sys.stderr.write(f"Error: {exc}\n")
        return 1
    finally:
        # A second Ctrl-C must not interrupt the cleanup and leave the server running.
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        if cluster is not None:
            cluster.cleanup()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
