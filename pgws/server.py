"""The composition root: `Gateway` wires the parts together (`process.run` runs one process).

Start: key and TLS checks and the port bound, then the LISTEN connection and the senders (with
retries), then sockets accepted. Stop (signal, or the listener lost without self-healing), in
reverse order through one AsyncExitStack: stop accepting, close sockets with 1001 while their
NOTIFYs finish, then close the database connections; all within PGWS_SHUTDOWN_TIMEOUT.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable
from typing import Any

import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from pgws import __version__, gateway_metrics, metrics, sse, sse_request, sse_stream, web
from pgws.buffers import BufferLedger
from pgws.bus import NotifyBus, SharedNotifyBus
from pgws.config import Config
from pgws.connection import SocketStats, deliver_gap, deliver_v2, tracked_connection_class
from pgws.db.connect import db_host
from pgws.db.retention import Retention, retention_running
from pgws.durable_bus import DurableBus
from pgws.errors import ConfigError
from pgws.fanout import fan_out
from pgws.handshake import Handshake, select_subprotocol
from pgws.jwks import JwksKeys
from pgws.metrics_http import MetricsListener
from pgws.net import ReloadableTls, listen_socket, tls_failures_quieted
from pgws.places import metrics_address
from pgws.registry import Registry
from pgws.reload import Reloading, warn_if_weak
from pgws.session import Sessions

log = structlog.get_logger("pgws.server")

# SPEC 3: the server pings each socket about every 30 s and drops one that stops answering.
PING_INTERVAL = 30.0
PING_TIMEOUT = 30.0


def _log_stopped() -> None:
    # Called rather than registered as `log.info`: a method bound at start-up would keep the
    # logging set-up of that moment.
    log.info("server_stopped")


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
    elif isinstance(response, sse_request.StreamResponse):
        # The stream takes the TCP connection (websockets then sends nothing), or a 503.
        return await response.begin(connection)
    return response


class Gateway(Reloading):
    """The running parts of one pgws process, exposed for the CLI, health checks and tests."""

    def __init__(
        self,
        config: Config,
        *,
        reuse_port: bool = False,
        shared_listener: str | None = None,
        worker: int | None = None,
        jwks: JwksKeys | None = None,
    ) -> None:
        self.config = config
        self._reuse_port = reuse_port  # a worker sharing the port with its siblings
        self._worker = worker  # its number: PGWS_METRICS=host:port puts worker i on port + i
        # PGWS_JWT_JWKS_URL: the keys the CLI already fetched, or fetched in run().
        if jwks is None and config.jwt_jwks_url is not None:
            jwks = JwksKeys.from_config(config)
        self.jwks = jwks
        self.verifier = self._new_verifier(config)
        self.tls = ReloadableTls(config)

        def feed(batch: list[str]) -> object:
            return self.registry.publish_batch(batch)  # the registry is made below

        def lost() -> object:
            # After a LISTEN outage: `gap` for non-durable channels (durable ones catch up).
            return self.registry.continuity_lost(
                None if self.durable is None else self.durable.is_durable
            )

        # --workers on one host: one LISTEN connection among them (shared_listener: its name).
        notify_bus = (
            NotifyBus(config, feed, lost)
            if shared_listener is None
            else SharedNotifyBus(config, feed, shared_listener, lost)
        )
        # SPEC 7: with any durable channel, the durable bus (NOTIFY still serves the others).
        self.durable: DurableBus | None = None
        self.bus: NotifyBus | DurableBus
        if config.durable:
            self.bus = self.durable = DurableBus(
                config,
                feed,
                deliver_stored=lambda ch, rows: self.registry.publish_stored(ch, rows),
                gap=self._gap,
                notify_bus=notify_bus,
                lost=lost,
            )
        else:
            self.bus = notify_bus
        self.registry: Registry[ServerConnection] = Registry(
            config.listen_channel,
            functools.partial(fan_out, buffer_limit=config.client_max_buffer),
            self.bus.publish,
            deliver_v2,
            deliver_gap,
            sse_stream.deliver,
            sse_stream.deliver_gap,
        )
        if self.durable is not None:
            self.registry.watch(self.durable.watch)
        # The bus's parts, for /metrics and the tests that reach into them.
        self.listener, self.notifier = self.bus.listener, self.bus.notifier
        # The one clock handshakes and sessions read, looked up at each call: tests replace it.
        self.clock: Callable[[], float] = time.time
        self.socket_stats = SocketStats()
        self.buffers = BufferLedger(config.max_buffered_total)
        # PGWS_METRICS: off builds nothing to collect; host:port serves it on its own listener.
        self._render = (
            None
            if config.metrics == "off"
            else metrics.exposition(functools.partial(gateway_metrics.snapshot, self))
        )
        self.metrics_listener: MetricsListener | None = None
        self.events = sse.EventStreams(
            config,
            self.registry,
            self.socket_stats,
            self.buffers,
            clock=lambda: self.clock(),
            durable=lambda: self.durable,
        )
        routes = web.Routes(
            config.root_path,
            ready=self.is_ready,
            metrics=self._render if config.metrics == "on" else None,
        )
        self.handshake = Handshake(
            config,
            self.verifier,
            self.socket_stats,
            self.buffers,
            plain=routes.answer,
            clock=lambda: self.clock(),
            events=sse_request.EventsEndpoint(
                config, self.events, clock=lambda: self.clock()
            ).answer,
        )
        self.sessions = Sessions(
            config,
            self.registry,
            self.socket_stats,
            verifier=lambda: self.handshake.verifier,
            clock=lambda: self.clock(),
            durable=self.durable,
        )
        self.server: Server | None = None
        self.retention: Retention | None = None  # durable mode's pruner (while running)
        self._connections: set[ServerConnection] = set()  # every TCP connection, even mid-handshake

    def _gap(self, channel: str) -> None:
        """A durable channel lost continuity here (rows pruned unread): v2 readers and event
        streams get `gap`."""
        self.registry.channel_lost(channel)

    def is_ready(self) -> bool:
        """Ready: accepting sockets and the LISTEN connection up (`/ready`, sd_notify)."""
        return self.server is not None and self.server.is_serving() and self.bus.is_up()

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
        """Serve until `stop` is set or a task fails, then stop in reverse order of start-up.

        Start: bind the port, LISTEN, open the senders, accept sockets. Stop: stop accepting and
        close the sockets (1001) while their NOTIFYs go out, let the senders finish what is
        queued, close the LISTEN connection, release the port.
        """
        config = self.config
        if self.jwks is not None:
            await self.jwks.start()  # before the port: no socket is taken without keys
        # Bound first, so a taken port fails at once rather than after the database retries;
        # connections are only accepted once serve() listens, after the database is up.
        sock = listen_socket(config.host, config.port, reuse_port=self._reuse_port)
        warn_if_weak(self.verifier)
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(_log_stopped)
            stack.callback(sock.close)  # already closed by the server if it got that far
            await self._serve_metrics(stack)
            stack.enter_context(tls_failures_quieted(asyncio.get_running_loop()))
            await self.bus.start(stack)
            if config.durable:  # SPEC 7 retention: one process of all prunes, at a time
                self.retention = await stack.enter_async_context(
                    retention_running(config.db_uri, config.durable_retention)
                )
            server = await stack.enter_async_context(
                serve(
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
                    ssl=self.tls.context,
                )
            )
            self.server = server
            stack.push_async_callback(self._close_sockets, server)
            await self._supervise(stop, on_ready)

    async def _serve_metrics(self, stack: contextlib.AsyncExitStack) -> None:
        """PGWS_METRICS=host:port: bind and serve its listener (before the database, so that a
        taken port fails at once and a scrape can see the database come up)."""
        address = metrics_address(self.config.metrics)
        if address is None or self._render is None:
            return
        host, port = address
        if port and self._worker:
            port += self._worker
        try:
            sock = listen_socket(host, port)
        except ConfigError as exc:
            raise ConfigError("PGWS_METRICS", exc.problem) from None
        stack.callback(sock.close)
        listener = MetricsListener(sock, self._render)
        await listener.start()
        stack.push_async_callback(listener.close)
        self.metrics_listener = listener
        log.info("metrics_listening", host=host, port=listener.port)

    async def _supervise(
        self, stop: asyncio.Event, on_ready: Callable[[Gateway], Any] | None
    ) -> None:
        async with asyncio.TaskGroup() as tasks:
            feeding = [tasks.create_task(self.bus.run(), name="bus")]
            if self.jwks is not None:
                feeding.append(tasks.create_task(self.jwks.refresh_forever(), name="jwks"))
            log.info(
                "server_started",
                port=self.port,
                host=self.config.host,
                tls=self.tls.context is not None,
                db_host=db_host(self.config.db_uri),
                listen_channel=self.config.listen_channel,
                event_loop=type(asyncio.get_running_loop()).__module__,
                version=__version__,
            )
            if on_ready is not None:
                on_ready(self)
            await stop.wait()  # a crashing child cancels this wait too
            for task in feeding:
                task.cancel()

    async def _close_sockets(self, server: Server) -> None:
        """Close every socket with 1001; abort the ones that do not go in time.

        The budget is PGWS_SHUTDOWN_TIMEOUT in all: most of it for closing handshakes, the rest
        for aborting stragglers (stalled readers, clients that never finished their handshake)
        and closing the database connections.
        """
        log.info("server_stopping", sockets=len(server.connections), streams=len(self.events.open))
        budget = self.config.shutdown_timeout
        server.close()
        self.events.end_all()
        try:
            async with asyncio.timeout(max(budget - 1.0, budget / 2)):
                await server.wait_closed()
                await self.events.wait_closed()
        except TimeoutError:
            stuck = list(self._connections)
            log.warning("sockets_aborted", count=len(stuck), streams=len(self.events.open))
            for conn in stuck:
                conn.transport.abort()
            self.events.abort_all()
            try:
                async with asyncio.timeout(0.5):
                    await server.wait_closed()
                    await self.events.wait_closed()
            except TimeoutError:
                log.error("sockets_left_open", count=len(self._connections))
