"""`run(config)`: start the gateway, supervise its tasks, stop it in order.

Start: key and TLS checks, LISTEN connection and pool (with retries), then the port. Stop (signal,
or the listener lost without self-healing): stop accepting, close sockets with 1001 while their
NOTIFYs finish, then close the database connections; all within PGWS_SHUTDOWN_TIMEOUT.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import ssl
from collections.abc import Callable
from typing import Any

import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from pgws import __version__, metrics, web
from pgws.claims import Verifier
from pgws.config import Config
from pgws.db.connect import db_host
from pgws.db.listener import Listener
from pgws.db.notifier import Notifier
from pgws.errors import ConfigError
from pgws.handler import Handler, deliver, select_subprotocol, tracked_connection_class
from pgws.registry import Registry
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
        self.ssl = tls_context(config)
        self.notifier = Notifier(config)
        self.registry: Registry[ServerConnection] = Registry(
            config.listen_channel, deliver, self.notifier.notify
        )
        self.listener = Listener(config, self.registry.publish_in)
        self.handler = Handler(
            config,
            self.verifier,
            self.registry,
            ready=self.is_ready,
            metrics=metrics.exposition(self),
        )
        self.server: Server | None = None
        self._connections: set[ServerConnection] = set()  # every TCP connection, even mid-handshake

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
        weakest = self.verifier.weakest_secret
        if weakest is not None and weakest < 32:
            log.warning("jwt_secret_weak", bytes=weakest, advice="use at least 32 random bytes")
        loop = asyncio.get_running_loop()
        previous_handler = loop.get_exception_handler()
        loop.set_exception_handler(quiet_tls_failures)
        try:
            await self.listener.connect()
            await self.notifier.open()
            async with serve(
                self.handler.handle,
                sock=sock,
                process_request=self.handler.check_request,
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


async def run(
    config: Config,
    systemd: SystemdNotifier | None = None,
    *,
    reuse_port: bool = False,
    parent_pipe: int | None = None,
) -> None:
    """Run pgws until SIGTERM/SIGINT (or a fatal error, which propagates).

    A worker passes `parent_pipe`: EOF on it (its supervisor is gone) stops it as SIGTERM does.
    """
    systemd = systemd or SystemdNotifier(None)
    gateway = Gateway(config, reuse_port=reuse_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def request_stop() -> None:
        if not stop.is_set():
            systemd.notify("STOPPING=1")
            stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop)
    if parent_pipe is not None:
        watch_parent_pipe(loop, parent_pipe, request_stop)

    def ready(_: Gateway) -> None:
        systemd.notify("READY=1")
        watchdog.set()

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
        for sig in (signal.SIGTERM, signal.SIGINT):
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
