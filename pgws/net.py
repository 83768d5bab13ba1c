"""Sockets and TLS: the listening socket PGWS_HOST names, the server TLS context, quiet failures.

Everything here is checked or built before the gateway serves, and each failure is a ConfigError
naming the variable, so a bad address, a taken port or an unusable certificate stops start-up in
one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import structlog

from pgws.config import Config
from pgws.errors import ConfigError

log = structlog.get_logger("pgws.net")


def listen_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """The one listening socket PGWS_HOST names, bound to `port`.

    `*4` (and warp's `!4`) is every IPv4 address; `*6` and `*` one dual-stack IPv6 socket that
    also takes IPv4 (falling back to IPv4 where the machine has no IPv6); `!6` IPv6 only; anything
    else is resolved and its first address bound. Failures are ConfigErrors naming the variable.
    """
    if host in ("*4", "!4"):
        candidates = [(socket.AF_INET, "0.0.0.0", False)]  # noqa: S104
    elif host in ("*6", "*"):
        candidates = [(socket.AF_INET6, "::", True), (socket.AF_INET, "0.0.0.0", False)]  # noqa: S104
    elif host == "!6":
        candidates = [(socket.AF_INET6, "::", False)]
    else:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise ConfigError("PGWS_HOST", f"cannot resolve {host!r}: {exc.strerror}") from None
        except ValueError:  # UnicodeError from the IDNA codec: `a..b`, a label over 63 characters
            raise ConfigError("PGWS_HOST", f"{host!r} is not a valid host name") from None
        candidates = [(family, str(address[0]), False) for family, *_, address in infos[:1]]
    error: OSError | None = None
    for family, address, dual_stack in candidates:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
            sock.bind((address, port))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError("PGWS_PORT", f"port {port} is already in use on {host}") from None
            error = exc
            continue
        sock.setblocking(False)
        return sock
    reason = error.strerror if error is not None else "no usable address"
    raise ConfigError("PGWS_HOST", f"cannot listen on {host!r}: {reason}")


def tls_context(config: Config) -> ssl.SSLContext | None:
    """The server TLS context, or None for plain ws://; an unusable file is a ConfigError.

    OpenSSL reports an unparseable certificate file and an unparseable key file alike ("[SSL] PEM
    lib", no reason), so on that error the certificate file is loaded on its own to name the right
    variable. An encrypted key makes OpenSSL call `password`, whose exception propagates
    unwrapped: pgws never prompts for a passphrase.
    """
    if config.certificate_file is None or config.key_file is None:
        return None
    certificate, key = config.certificate_file, config.key_file
    for name, path in (("PGWS_CERTIFICATE_FILE", certificate), ("PGWS_KEY_FILE", key)):
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            raise ConfigError(name, f"cannot read {str(path)!r}: {exc.strerror}") from None

    def no_passphrase() -> bytes:
        raise ConfigError(
            "PGWS_KEY_FILE", f"{str(key)!r} is encrypted; pgws needs a key without a passphrase"
        )

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certificate, key, password=no_passphrase)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(
                "PGWS_KEY_FILE",
                f"{str(key)!r} does not match the certificate in PGWS_CERTIFICATE_FILE",
            ) from None
        try:  # alone, as CA certificates: fails the same way only if the certificate is at fault
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=certificate)
        except ssl.SSLError:
            raise ConfigError(
                "PGWS_CERTIFICATE_FILE", f"no PEM certificate in {str(certificate)!r}"
            ) from None
        detail = f" ({exc.reason})" if exc.reason else ""
        raise ConfigError("PGWS_KEY_FILE", f"no PEM private key in {str(key)!r}{detail}") from None
    return context


def tls_digests(config: Config) -> tuple[bytes, bytes]:
    """Hashes of the certificate and key files, to tell which of them a reload changed."""
    digests = []
    for name, path in (
        ("PGWS_CERTIFICATE_FILE", config.certificate_file),
        ("PGWS_KEY_FILE", config.key_file),
    ):
        if path is None:
            digests.append(b"")
            continue
        try:
            digests.append(hashlib.sha256(path.read_bytes()).digest())
        except OSError as exc:
            raise ConfigError(name, f"cannot read {str(path)!r}: {exc.strerror}") from None
    return digests[0], digests[1]


class ReloadableTls:
    """The server TLS context, whose certificate SIGHUP swaps without touching the socket.

    `context` is what the server starts with; each handshake switches to the current context from
    its SNI callback (called with or without SNI), so new TLS connections get a reloaded
    certificate and open ones keep theirs.
    """

    def __init__(self, config: Config) -> None:
        self.context = tls_context(config)
        self._current = self.context
        self._digests = tls_digests(config)
        if self.context is not None:
            self.context.sni_callback = self._use_current

    def _use_current(
        self, connection: ssl.SSLObject | ssl.SSLSocket, _server_name: str | None, _: ssl.SSLContext
    ) -> None:
        if self._current is not None and connection.context is not self._current:
            connection.context = self._current

    def reload(self, new: Config) -> list[str]:
        """Serve `new`'s certificate and key from now on; return the variables whose files changed.

        Raises ConfigError, keeping the current ones, when they do not load.
        """
        digests = tls_digests(new)
        context = tls_context(new)
        names = ("PGWS_CERTIFICATE_FILE", "PGWS_KEY_FILE")
        changed = [name for name, a, b in zip(names, self._digests, digests, strict=True) if a != b]
        self._current, self._digests = context, digests
        return changed


# asyncio reports a failed accept (a TLS handshake included) with this message, in debug mode.
_ACCEPT_FAILED = "Error on transport creation for incoming connection"


def quiet_tls_failures(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Loop exception handler: a client's failed TLS handshake is one INFO line, not an ERROR.

    A plain ws:// client or an HTTP probe on the wss:// port is the client's mistake; every other
    error goes to the default handler unchanged.
    """
    exc = context.get("exception")
    if context.get("message") == _ACCEPT_FAILED and isinstance(exc, ssl.SSLError | ConnectionError):
        reason = exc.reason if isinstance(exc, ssl.SSLError) else type(exc).__name__
        log.info("tls_handshake_failed", error=reason)
        return
    loop.default_exception_handler(context)


@contextlib.contextmanager
def tls_failures_quieted(loop: asyncio.AbstractEventLoop) -> Iterator[None]:
    """Make quiet_tls_failures the loop's exception handler while the block runs."""
    previous = loop.get_exception_handler()
    loop.set_exception_handler(quiet_tls_failures)
    try:
        yield
    finally:
        loop.set_exception_handler(previous)
