"""Opening connections: settings pgws adds, retries with back-off, errors no retry can fix."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg
import structlog
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgws.errors import ConfigError, DatabaseUnavailable
from pgws.logs import REDACTED

log = structlog.get_logger("pgws.db.connect")

# How long opening a connection may take (the sampler's; senders also stay within NOTIFY_TIMEOUT).
CONNECT_TIMEOUT = 5.0
# Keep the LISTEN connection alive through idle firewalls and notice a dead peer without traffic.
_KEEPALIVES = {
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
    "connect_timeout": "10",
}


class Backoff:
    """Exponential back-off delays: initial, doubling, capped, with a little jitter."""

    def __init__(self, initial: float = 1.0, cap: float = 32.0, jitter: float = 0.1) -> None:
        self._initial, self._cap, self._jitter = initial, cap, jitter
        self._next = initial

    def next(self) -> float:
        """The delay before the next attempt; each call doubles the following one."""
        delay = self._next
        self._next = min(self._next * 2, self._cap)
        return delay * (1 + random.uniform(-self._jitter, self._jitter))  # noqa: S311

    def reset(self) -> None:
        """Start again from the initial delay (after a success)."""
        self._next = self._initial


def connection_kwargs(db_uri: str, application_name: str) -> dict[str, Any]:
    """Connection settings pgws adds, without overriding any the operator put in the URI."""
    try:
        given = conninfo_to_dict(db_uri)
    except psycopg.ProgrammingError:
        given = {}  # a bad URI is reported by the connection attempt itself
    defaults = {**_KEEPALIVES, "application_name": application_name}
    kwargs = {key: value for key, value in defaults.items() if key not in given}
    # Always UTF-8, whatever the role, the database or the URI say: with LATIN1 one writer's
    # euro sign would break the LISTEN connection for everyone (SQL_ASCII passes bytes through).
    kwargs["client_encoding"] = "UTF8"
    return kwargs


def db_host(db_uri: str) -> str:
    """Where the database is, for logs: host and port, never the user or password."""
    try:
        info = conninfo_to_dict(db_uri)
    except psycopg.ProgrammingError:
        return "?"
    return f"{info.get('host', 'localhost')}:{info.get('port', 5432)}"


def db_target(db_uri: str) -> str:
    """Host, port and database name, for error lines: never the user or password."""
    try:
        info = conninfo_to_dict(db_uri)
    except psycopg.ProgrammingError:
        return "?"
    return f"{db_host(db_uri)}/{info.get('dbname', info.get('user', '?'))}"


def check_db_uri(value: str) -> None:
    """Refuse a connection string libpq cannot parse; the error never repeats it (passwords).

    Config.from_env calls it (check_db_uri=) before anything connects, so a typo is one
    `PGWS_DB_URI:` line at start-up rather than a failed connection.
    """
    try:
        info = conninfo_to_dict(value)
    except psycopg.ProgrammingError:
        raise ConfigError(
            "PGWS_DB_URI",
            "not a valid connection string: expected postgresql://user:password@host:port/dbname"
            " or key=value pairs (the value is not shown: it may hold a password)",
        ) from None
    for port in str(info.get("port") or "5432").split(","):
        if not (port.isdigit() and 1 <= int(port) <= 65535):
            raise ConfigError("PGWS_DB_URI", f"port {port!r} is not a number from 1 to 65535")


def masked_db_uri(value: str) -> str:
    """The connection string as key=value pairs, every password replaced by [redacted]."""
    try:
        params: dict[str, Any] = conninfo_to_dict(value)
    except psycopg.ProgrammingError:
        return REDACTED
    for key in params:
        if "password" in key:  # password, sslpassword
            params[key] = REDACTED
    return make_conninfo(**params)


# Connection failures that no retry can fix: refused credentials, a missing database or role,
# a bad option. They end start-up at once (exit 78) instead of a restart loop.
_PERMANENT_FAILURES = (
    "password authentication failed",
    "no password supplied",
    "authentication failed",
    "does not exist",
    "invalid connection option",
    "invalid sslmode",
    "no pg_hba.conf entry",
    "is not permitted to log in",
    "invalid integer value",
    "invalid value for parameter",
)


def is_permanent(exc: BaseException) -> bool:
    """Whether a connection error says something about the settings rather than the network."""
    text = str(exc).lower()
    return any(marker in text for marker in _PERMANENT_FAILURES)


def describe(exc: BaseException) -> str:
    """A one-line, password-free description of a database error."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


async def with_retries(
    what: str,
    attempts: int,
    connect: Callable[[], Awaitable[Any]],
    *,
    where: str,
    initial: float = 1.0,
) -> Any:
    """Call `connect` up to `attempts` times with back-off (SPEC 4); raise DatabaseUnavailable.

    `where` (db_target()) names the database in every line, since libpq's own text does not
    always (a timeout says only "connection timeout expired").
    """
    backoff = Backoff(initial=initial)
    for attempt in range(1, attempts + 1):
        try:
            return await connect()
        except psycopg.ProgrammingError:
            # Its text may quote the whole connection string, password included.
            raise ConfigError("PGWS_DB_URI", "not a valid connection string") from None
        except (psycopg.OperationalError, OSError) as exc:
            if is_permanent(exc):
                raise ConfigError("PGWS_DB_URI", f"{what} at {where}: {describe(exc)}") from None
            if attempt == attempts:
                raise DatabaseUnavailable(
                    f"cannot connect to the database at {where} after {attempts}"
                    f" attempt{'' if attempts == 1 else 's'}:"
                    f" {describe(exc)}"
                ) from None
            delay = backoff.next()
            log.warning(
                "database_unreachable",
                what=what,
                database=where,
                attempt=attempt,
                error=describe(exc),
                retry_in=round(delay, 2),
            )
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def sever(conn: psycopg.AsyncConnection[Any]) -> None:
    """Shut the connection's socket down under it, so whatever awaits it fails at once.

    Cancelling a psycopg query instead would send a cancel request over a new connection, which
    hangs on exactly the frozen backends and silent networks this is for.
    """
    with contextlib.suppress(OSError, psycopg.Error, ValueError):
        duplicate = socket.socket(fileno=os.dup(conn.fileno()))
        try:
            duplicate.shutdown(socket.SHUT_RDWR)
        finally:
            duplicate.close()


@contextlib.asynccontextmanager
async def severed_after(conn: psycopg.AsyncConnection[Any], seconds: float) -> AsyncIterator[None]:
    """Bound a database round trip: past `seconds` the connection is severed (OperationalError)."""
    timer = asyncio.get_running_loop().call_later(seconds, sever, conn)
    try:
        yield
    finally:
        timer.cancel()
