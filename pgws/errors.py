"""The exceptions pgws raises on purpose.

Errors that reach a client carry their outcome as class attributes (an HTTP status before the
upgrade, a close code after it), so the handler maps them to the wire in one place.
"""

from __future__ import annotations

import asyncio
import contextlib

# Everything a client learns from a token that does not verify (SPEC 2): the same words whatever
# was wrong, so a refusal tells an attacker nothing.
INVALID_TOKEN = "invalid token"  # noqa: S105  (a message, not a password)


class PgwsError(Exception):
    """Base class for every error pgws raises on purpose."""

    exit_code = 1  # the status `pgws serve` exits with when this error stops it


class ConfigError(PgwsError):
    """A setting is missing or invalid; start-up stops with exit status 78 (EX_CONFIG)."""

    exit_code = 78

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name}: {problem}")
        self.name, self.problem = name, problem


class HandshakeRefused(PgwsError):
    """A WebSocket upgrade request that pgws answers with an HTTP error instead."""

    status = 400


class BadRequest(HandshakeRefused):
    """The request itself is malformed (path shape, encoding)."""

    status = 400


class Unauthorized(HandshakeRefused):
    """The token does not verify; the reason is deliberately the same for every failure."""

    status = 401


class TokenExpired(Unauthorized):
    """The token verified but its `exp` has passed."""


class Forbidden(HandshakeRefused):
    """The token is valid but grants nothing on this request."""

    status = 403


class ServiceUnavailable(HandshakeRefused):
    """The server cannot take another socket right now (PGWS_MAX_CONNECTIONS)."""

    status = 503


class MessageRefused(PgwsError):
    """A client frame that cannot become a NOTIFY; the socket is closed with `close_code`."""

    close_code = 1011


class MessageTooBig(MessageRefused):
    """The envelope would exceed PostgreSQL's NOTIFY payload limit."""

    close_code = 1009


class NotifyFailed(MessageRefused):
    """The database did not accept a NOTIFY (down, or refused it)."""

    close_code = 1011


class DatabaseUnavailable(PgwsError):
    """PostgreSQL could not be reached within the configured retries."""

    exit_code = 69  # EX_UNAVAILABLE


class ListenerLost(PgwsError):
    """The LISTEN connection died and self-healing is off (PGWS_CHECK_LISTENER_INTERVAL unset)."""

    exit_code = 69  # EX_UNAVAILABLE: systemd's Restart=on-failure brings the process back


def first_pgws_error(exc: BaseException) -> PgwsError | None:
    """The PgwsError inside an exception (group), if any: what the operator should read."""
    if isinstance(exc, PgwsError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := first_pgws_error(inner)) is not None:
                return found
    return None


class SchemaMismatch(PgwsError):
    """The database's pgws schema is missing or not the version this pgws knows (SPEC 7)."""

    exit_code = 78  # EX_CONFIG: `pgws migrate` (or a DBA) has to act


class KeyUnknown(Unauthorized):
    """The token names a `kid` the JWKS from PGWS_JWT_JWKS_URL does not hold (yet); a refetch
    has been asked for. A caller that can wait awaits `refetched()`, which is bounded, and
    verifies once more; any other caller answers it as the 401 it is."""

    wait_limit = 5.0  # seconds a handshake waits for the refetch (the fetch itself may take 10)

    def __init__(self, refetched: asyncio.Event) -> None:
        super().__init__("invalid token")
        self._refetched = refetched

    async def refetched(self) -> None:
        """Return once the refetch has ended (keys replaced or kept), or after `wait_limit`."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.wait_limit):
                await self._refetched.wait()
