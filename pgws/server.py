"""`run(config)`: start the gateway, supervise its tasks, stop it in order.

Start: key and TLS checks, LISTEN connection and pool (with retries), then the port. Stop (signal,
or the listener lost without self-healing): stop accepting, close sockets with 1001 while their
NOTIFYs finish, then close the database connections; all within PGWS_SHUTDOWN_TIMEOUT.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from pgws import __version__, metrics, web
from pgws.buffers import BufferLedger
from pgws.claims import Verifier
from pgws.config import Config
from pgws.connection import SocketStats, deliver, tracked_connection_class
from pgws.db.connect import db_host
from pgws.db.listener import Listener
from pgws.db.notifier import Notifier
from pgws.errors import ConfigError
from pgws.handshake import Handshake, select_subprotocol
from pgws.registry import Registry
from pgws.session import Sessions
from pgws.systemd import SystemdNotifier

log = structlog.get_logger("pgws.server")

# SPEC 3: the server pings each socket about every 30 s and drops one that stops answering.
PING_INTERVAL = 30.0
PING_TIMEOUT = 30.0
# How often pg_notification_queue_usage() is read for /metrics.
QUEUE_SAMPLE_INTERVAL = 10.0


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


# Config fields SIGHUP applies to a running gateway; every other change needs a restart.
_RELOADABLE = frozenset(
    {"jwt_secret", "jwt_audience", "jwt_issuer", "certificate_file", "key_file"}
)


def _variable(field: str) -> str:
    """The PGWS_* variable behind a Config field (STYLE: PGWS_X is Config.x)."""
    return f"PGWS_{field.upper()}"


def _tls_digests(config: Config) -> tuple[bytes, bytes]:
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


def _warn_if_weak(verifier: Verifier) -> None:
    weakest = verifier.weakest_secret
    if weakest is not None and weakest < 32:
        log.warning("jwt_secret_weak", bytes=weakest, advice="use at least 32 random bytes")


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


async def finish_response(
    connection: ServerConnection, request: Request, response: Response
) -> Response:
    """process_response: pgws's headers on websockets' own refusals (400, 414, 431…) too; and
    a static file, its headers now final (Server included), streamed to the socket here."""
    if response.status_code != 101:
        for name, value in web.SECURITY_HEADERS.items():
            if name not in response.headers:
                response.headers[name] = value
    if isinstance(response, web.FileResponse):
        await web.send_file(connection, response)  # closes the socket: websockets sends nothing
    return response


class Gateway:
    """The running parts of one pgws process, exposed for the CLI, health checks and tests."""

    def __init__(self, config: Config, *, reuse_port: bool = False) -> None:
        self.config = config
        self._reuse_port = reuse_port  # a worker sharing the port with its siblings
        self.verifier = Verifier.from_secret(
            config.jwt_secret, audience=config.jwt_audience, issuer=config.jwt_issuer
        )
        # `ssl` is the context the server was started with; each handshake switches to
        # `_tls_current` from its SNI callback (called with or without SNI), so SIGHUP can swap
        # certificates without touching the listening socket.
        self.ssl = tls_context(config)
        self._tls_current = self.ssl
        self._tls_digests = _tls_digests(config)
        if self.ssl is not None:
            self.ssl.sni_callback = self._use_current_certificate
        self.notifier = Notifier(config)
        self.registry: Registry[ServerConnection] = Registry(
            config.listen_channel, deliver, self.notifier.notify
        )
        self.listener = Listener(config, self.registry.publish_in)
        # The one clock handshakes and sessions read, looked up at each call: tests replace it.
        self.clock: Callable[[], float] = time.time
        self.socket_stats = SocketStats()
        self.buffers = BufferLedger(config.max_buffered_total)
        routes = web.Routes(config.root_path, ready=self.is_ready, metrics=metrics.exposition(self))
        self.handshake = Handshake(
            config,
            self.verifier,
            self.socket_stats,
            self.buffers,
            plain=routes.answer,
            clock=lambda: self.clock(),
        )
        self.sessions = Sessions(
            config, self.registry, self.socket_stats, clock=lambda: self.clock()
        )
        self.server: Server | None = None
        self._connections: set[ServerConnection] = set()  # every TCP connection, even mid-handshake

    def _use_current_certificate(
        self, connection: ssl.SSLObject | ssl.SSLSocket, _server_name: str | None, _: ssl.SSLContext
    ) -> None:
        if self._tls_current is not None and connection.context is not self._tls_current:
            connection.context = self._tls_current

    def reload(self, new: Config) -> list[str]:
        """SIGHUP: apply a new token key and TLS certificate; return the variables that changed.

        Sockets stay open: the verifier only checks new handshakes, the certificate only serves
        new TLS connections. A new value that does not load keeps the old one (a warning says
        why); settings that need a restart are named in a warning and otherwise ignored.
        """
        changed = [*self._reload_verifier(new), *self._reload_certificate(new)]
        needs_restart = [
            _variable(field.name)
            for field in dataclasses.fields(Config)
            if field.name not in _RELOADABLE
            and getattr(self.config, field.name) != getattr(new, field.name)
        ]
        if self.config.tls != new.tls:
            needs_restart += ["PGWS_CERTIFICATE_FILE", "PGWS_KEY_FILE"]
        if needs_restart:
            log.warning("reload_needs_restart", settings=needs_restart)
        log.info("reloaded", changed=changed)
        return changed

    def _reload_verifier(self, new: Config) -> list[str]:
        old = self.config
        fields = ("jwt_secret", "jwt_audience", "jwt_issuer")
        changed = [_variable(f) for f in fields if getattr(old, f) != getattr(new, f)]
        if not changed:
            return []
        try:
            verifier = Verifier.from_secret(
                new.jwt_secret, audience=new.jwt_audience, issuer=new.jwt_issuer
            )
        except ConfigError as exc:
            log.warning("reload_rejected", setting=exc.name, error=exc.problem, kept="old value")
            return []
        self.verifier = self.handshake.verifier = verifier
        self.config = dataclasses.replace(
            self.config, **{field: getattr(new, field) for field in fields}
        )
        _warn_if_weak(verifier)
        return changed

    def _reload_certificate(self, new: Config) -> list[str]:
        if self.ssl is None or not new.tls:
            return []  # turning TLS on or off needs a restart
        try:
            digests = _tls_digests(new)
            context = tls_context(new)
        except ConfigError as exc:
            log.warning("reload_rejected", setting=exc.name, error=exc.problem, kept="old value")
            return []
        names = ("PGWS_CERTIFICATE_FILE", "PGWS_KEY_FILE")
        changed = [
            name for name, a, b in zip(names, self._tls_digests, digests, strict=True) if a != b
        ]
        self._tls_current, self._tls_digests = context, digests
        self.config = dataclasses.replace(
            self.config, certificate_file=new.certificate_file, key_file=new.key_file
        )
        return changed

    def is_ready(self) -> bool:
        """Ready: accepting sockets and the LISTEN connection up (`/ready`, sd_notify)."""
        return self.server is not None and self.server.is_serving() and self.listener.up.is_set()

    def buffered_bytes(self) -> int:
        """What every socket's transport holds unsent right now (read at each scrape)."""
        total = 0
        for conn in self._connections:
            try:
                total += conn.transport.get_write_buffer_size()
            except (AttributeError, RuntimeError):
                continue  # not connected yet, or already gone
        return total

    @property
    def port(self) -> int:
        """The bound TCP port (useful with PGWS_PORT=0)."""
        if self.server is None:
            raise RuntimeError("the gateway is not serving yet")
        return int(self.server.sockets[0].getsockname()[1])

    async def run(
        self,
        stop: asyncio.Event,
        on_ready: Callable[[Gateway], Any] | None = None,
    ) -> None:
        """Serve until `stop` is set or a task fails; always shut down in order."""
        config = self.config
        # Bound first, so a taken port fails at once rather than after the database retries;
        # connections are only accepted once serve() listens, after the database is up.
        sock = listen_socket(config.host, config.port, reuse_port=self._reuse_port)
        _warn_if_weak(self.verifier)
        loop = asyncio.get_running_loop()
        previous_handler = loop.get_exception_handler()
        loop.set_exception_handler(quiet_tls_failures)
        try:
            await self.listener.connect()
            await self.notifier.open()
            async with serve(
                self.sessions.handle,
                sock=sock,
                process_request=self.handshake.check_request,
                process_response=finish_response,
                select_subprotocol=select_subprotocol,
                create_connection=tracked_connection_class(self._connections),
                compression="deflate" if config.compression else None,
                max_size=config.max_message_size,
                write_limit=config.client_max_buffer,
                ping_interval=PING_INTERVAL,
                ping_timeout=PING_TIMEOUT,
                close_timeout=min(config.shutdown_timeout / 2, 10.0),
                server_header=f"pgws/{__version__}",
                ssl=self.ssl,
            ) as server:
                self.server = server
                try:
                    await self._supervise(stop, on_ready)
                finally:
                    log.info("server_stopping", sockets=len(server.connections))
                    await self._close_sockets(server)
        finally:
            loop.set_exception_handler(previous_handler)
            sock.close()  # already closed by the server if it got that far
            await self.notifier.close()
            await self.listener.close()
            log.info("server_stopped")

    async def _supervise(
        self, stop: asyncio.Event, on_ready: Callable[[Gateway], Any] | None
    ) -> None:
        async with asyncio.TaskGroup() as tasks:
            listening = tasks.create_task(self.listener.listen_forever(), name="listener")
            sampling = tasks.create_task(
                self.notifier.sample_queue_usage_forever(QUEUE_SAMPLE_INTERVAL), name="queue-usage"
            )
            log.info(
                "server_started",
                port=self.port,
                host=self.config.host,
                tls=self.ssl is not None,
                db_host=db_host(self.config.db_uri),
                listen_channel=self.config.listen_channel,
                event_loop=type(asyncio.get_running_loop()).__module__,
                version=__version__,
            )
            if on_ready is not None:
                on_ready(self)
            await stop.wait()  # a crashing child cancels this wait too
            listening.cancel()
            sampling.cancel()

    async def _close_sockets(self, server: Server) -> None:
        """Close every socket with 1001; abort the ones that do not go in time.

        The budget is PGWS_SHUTDOWN_TIMEOUT in all: most of it for closing handshakes, the rest
        for aborting stragglers (stalled readers, clients that never finished their handshake)
        and closing the database connections.
        """
        budget = self.config.shutdown_timeout
        server.close()
        try:
            async with asyncio.timeout(max(budget - 1.0, budget / 2)):
                await server.wait_closed()
        except TimeoutError:
            stuck = list(self._connections)
            log.warning("sockets_aborted", count=len(stuck))
            for conn in stuck:
                conn.transport.abort()
            try:
                async with asyncio.timeout(0.5):
                    await server.wait_closed()
            except TimeoutError:
                log.error("sockets_left_open", count=len(self._connections))


# SIGQUIT stops as gracefully as SIGTERM (nginx's meaning; Python's default would dump core
# without closing sockets). SIGUSR1/2 mean nothing to pgws: logged and ignored, never fatal.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
IGNORED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


def log_ignored_signal(sig: signal.Signals) -> None:
    """The handler of SIGUSR1/SIGUSR2: one line, so a stray `kill -USR1` is visible."""
    log.info("signal_ignored", signal=sig.name)


async def run(
    config: Config,
    systemd: SystemdNotifier | None = None,
    *,
    reuse_port: bool = False,
    parent_pipe: int | None = None,
    reload_config: Callable[[], Config] | None = None,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Run pgws until SIGTERM/SIGINT/SIGQUIT (or a fatal error, which propagates).

    SIGHUP calls `reload_config` (the CLI re-reads the environment and the env file) and applies
    what can change without dropping sockets; without it, the same settings are read again,
    which still picks up new contents of the TLS files. A worker passes `parent_pipe`: EOF on it
    (its supervisor is gone) stops it as SIGTERM does.
    """
    systemd = systemd or SystemdNotifier(None)
    gateway = Gateway(config, reuse_port=reuse_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def request_stop(sig: signal.Signals | None = None) -> None:
        if not stop.is_set():
            if sig is not None:  # else the supervisor is gone, which is logged where noticed
                log.info("signal_received", signal=sig.name)
            systemd.notify("STOPPING=1")
            stop.set()

    def reload() -> None:
        try:
            new = reload_config() if reload_config is not None else gateway.config
        except ConfigError as exc:
            log.warning("reload_failed", setting=exc.name, error=exc.problem, kept="all settings")
            return
        gateway.reload(new)

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, request_stop, sig)
    for sig in IGNORED_SIGNALS:
        loop.add_signal_handler(sig, log_ignored_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, reload)
    if parent_pipe is not None:
        watch_parent_pipe(loop, parent_pipe, request_stop)

    def ready(_: Gateway) -> None:
        systemd.notify("READY=1")
        watchdog.set()
        if on_ready is not None:
            on_ready()

    watchdog = asyncio.Event()

    async def ping_once_ready() -> None:
        await watchdog.wait()
        await systemd.watchdog_forever()

    try:
        async with asyncio.TaskGroup() as tasks:
            pinging = tasks.create_task(ping_once_ready(), name="watchdog")
            try:
                await gateway.run(stop, ready)
            finally:
                if not stop.is_set():  # stopped by an error rather than a signal
                    systemd.notify("STOPPING=1")
                pinging.cancel()
    finally:
        for sig in (*STOP_SIGNALS, *IGNORED_SIGNALS, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        if parent_pipe is not None:
            loop.remove_reader(parent_pipe)


def watch_parent_pipe(
    loop: asyncio.AbstractEventLoop, fd: int, request_stop: Callable[[], None]
) -> None:
    """Call `request_stop` once `fd` reads EOF: the only holder of its write end has exited."""
    os.set_blocking(fd, False)

    def readable() -> None:
        try:
            if os.read(fd, 64):
                return  # nobody writes to it; ignore anything that comes
        except BlockingIOError:
            return
        except OSError:
            pass  # as good as EOF
        loop.remove_reader(fd)
        log.warning("supervisor_gone", action="stop")
        request_stop()

    loop.add_reader(fd, readable)
