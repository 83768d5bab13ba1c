"""One `pgws.v2` socket, from open to close: it runs the v2 protocol's actions (SPEC 8).

The socket starts with no subscriptions and, without a handshake token, has PGWS_AUTH_TIMEOUT
seconds to send `auth`. `sub`/`unsub` change its registry subscriptions as it runs; `auth` on an
open socket swaps the grant and its expiry and ends what the new grant does not cover. Before
`exp` it is sent `expiring`; at `exp` it is closed 3001 as in SPEC 3.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable, Sequence

import structlog
from websockets.asyncio.server import ServerConnection, broadcast
from websockets.exceptions import ConnectionClosed

from pgws.claims import Grant, Verifier, grant_for_v2
from pgws.config import Config
from pgws.connection import Connection, SocketStats, peer
from pgws.durable_bus import DurableBus, NotRecovered, Replay
from pgws.envelope import EnvelopeWriter, inspect_notification
from pgws.errors import DatabaseUnavailable, HandshakeRefused, NotifyFailed
from pgws.protocols import v2
from pgws.registry import Registry

log = structlog.get_logger("pgws.handler")

# What an open v2 socket counts as in open_by_mode before its first `auth`: counted for
# PGWS_MAX_CONNECTIONS, not shown under any mode in /metrics.
UNAUTHENTICATED = "unauthenticated"


@dataclasses.dataclass(slots=True)
class _Socket:
    """What the session knows of one v2 socket besides the connection itself."""

    conn: Connection
    grant: Grant | None = None
    writer: EnvelopeWriter | None = None
    subscribed: dict[str, bool] = dataclasses.field(default_factory=dict)  # channel -> echo
    counted_as: str = UNAUTHENTICATED
    timers: list[asyncio.TimerHandle] = dataclasses.field(default_factory=list)
    warning: asyncio.Task[None] | None = None


class V2Sessions:
    """Runs each accepted `pgws.v2` socket until it closes."""

    def __init__(
        self,
        config: Config,
        registry: Registry[ServerConnection],
        stats: SocketStats,
        verifier: Callable[[], Verifier],
        clock: Callable[[], float],
        *,
        durable: DurableBus | None = None,
    ) -> None:
        self._config = config
        self._durable = durable  # None: durable mode off (every `from` is recovered:false)
        self._registry = registry
        self._stats = stats
        self._verifier = verifier  # looked up per `auth`: SIGHUP may replace the key
        self._clock = clock

    async def handle(self, conn: Connection) -> None:
        """Run one accepted v2 socket until it closes."""
        conn.opened_at = self._clock()
        conn.v2_sender = str(conn.id)
        socket = _Socket(conn)
        structlog.contextvars.bind_contextvars(conn_id=str(conn.id)[:8])
        log.info("client_connected", remote=peer(conn), protocol=v2.SUBPROTOCOL)
        self._stats.open_by_mode[socket.counted_as] += 1  # uncounted first in the `finally`
        try:
            if conn.v2_grant is not None:
                self._take(socket, conn.v2_grant)
            else:
                socket.timers.append(
                    conn.loop.call_later(
                        self._config.auth_timeout, conn.drop, v2.AUTH_FAILED, "auth timeout"
                    )
                )
            await self._receive_forever(socket)
        except ConnectionClosed:
            pass
        except Exception:  # the task boundary: a bug costs this socket, never the server
            log.exception("handler_crashed")
            await conn.close(1011, "internal error")
        finally:
            self._stats.open_by_mode[socket.counted_as] -= 1
            self._stop_timers(socket)
            self._registry.unsubscribe_v2(conn, list(socket.subscribed))
            log.info(
                "client_disconnected",
                code=conn.close_code,
                reason=conn.close_reason,
                frames_in=conn.frames_in,
                seconds=round(self._clock() - conn.opened_at, 3),
            )

    async def _receive_forever(self, socket: _Socket) -> None:
        conn = socket.conn
        async for frame in conn:
            conn.frames_in += 1
            self._stats.frames_in += 1
            if conn.dropped:
                break
            actions = v2.receive(
                socket.grant,
                socket.subscribed,
                socket.writer,
                frame,
                self._clock(),
                max_channels=self._config.max_channels,
            )
            if not await self._execute(socket, actions):
                break
        if conn.dropped:
            await conn.wait_closed()

    async def _execute(self, socket: _Socket, actions: Sequence[v2.Action]) -> bool:
        """Carry out one frame's actions in order; False once the socket is being closed."""
        conn = socket.conn
        for action in actions:
            if conn.dropped:
                return False
            match action:
                case v2.Reply():
                    await conn.send(action.text)
                case v2.Close():
                    if action.at_once:
                        conn.drop(action.code, action.reason)
                    else:
                        await conn.close(action.code, action.reason)
                    return False
                case v2.Authenticate():
                    if not await self._authenticate(socket, action):
                        return False
                case v2.Subscribe():
                    durable = self._durable
                    if action.resume and durable is not None and durable.is_durable(action.channel):
                        await self._resume(socket, action, durable)
                        continue
                    self._subscribe(socket, action)
                    if durable is not None:  # `ok` once live: a `pub` after it is heard
                        await durable.until_following([action.channel])
                    extra = {"recovered": False} if action.resume else {}
                    await conn.send(v2.ok(action.ref, ch=action.channel, **extra))
                case v2.Unsubscribe():
                    self._end(socket, [action.channel])
                    await conn.send(v2.ok(action.ref, ch=action.channel))
                case v2.Publish():
                    await conn.send(await self._publish(action))
        return True

    def _subscribe(self, socket: _Socket, action: v2.Subscribe) -> None:
        conn = socket.conn
        socket.subscribed[action.channel] = action.echo
        if not action.echo:
            conn.v2_no_echo = conn.v2_no_echo | {action.channel}
        self._registry.subscribe_v2(conn, action.channel)

    async def _resume(self, socket: _Socket, action: v2.Subscribe, durable: DurableBus) -> None:
        """`sub` with `from` on a durable channel: `ok` + exact replay then live, or
        `recovered:false` with the reason and live from now; 503 when the database is away."""
        conn, channel = socket.conn, action.channel

        def start(result: Replay | NotRecovered) -> None:
            # Synchronous writes, then the subscription: nothing live can come in between.
            if isinstance(result, Replay):
                frames = [v2.ok(action.ref, ch=channel, recovered=True)]
                for message in result.messages:
                    is_json, _ = inspect_notification(message.payload)
                    frames.append(v2.msg(channel, message.payload, is_json, message.position))
            else:
                reason = str(result.reason)
                frames = [v2.ok(action.ref, ch=channel, recovered=False, reason=reason)]
            for frame in frames:
                broadcast((conn,), frame)
            self._subscribe(socket, action)

        try:
            await durable.subscribe_from(channel, action.position or "", start)
        except DatabaseUnavailable as exc:
            log.info("resume_failed", reason=str(exc))
            await conn.send(v2.err(action.ref, v2.UNAVAILABLE, "database unavailable", retry=True))

    async def _publish(self, action: v2.Publish) -> str:
        """Send the envelope; the reply says whether it went (503, retry, when it did not)."""
        try:
            position = await self._registry.publish_out(action.envelope, action.channel)
        except (NotifyFailed, DatabaseUnavailable) as exc:
            log.info("publish_failed", reason=str(exc))
            return v2.err(action.ref, v2.UNAVAILABLE, "database unavailable", retry=True)
        if position is not None:
            return v2.ok(action.ref, ch=action.channel, pos=position)
        return v2.ok(action.ref, ch=action.channel)

    async def _authenticate(self, socket: _Socket, action: v2.Authenticate) -> bool:
        """First auth or refresh; False when a failed first auth closed the socket (4401)."""
        conn = socket.conn
        try:
            verifier = self._verifier()
            claims = verifier.verify(action.token, self._clock())
            grant = grant_for_v2(claims, leeway=verifier.leeway)
            writer = EnvelopeWriter(
                grant.claims, sender=conn.v2_sender, limit=self._config.envelope_limit
            )
        except (HandshakeRefused, TypeError, ValueError, RecursionError) as exc:
            code = exc.status if isinstance(exc, HandshakeRefused) else v2.NOT_GRANTED
            reason = str(exc) if isinstance(exc, HandshakeRefused) else "invalid claims"
            await conn.send(v2.err(action.ref, code, reason))
            if socket.grant is None:
                await conn.close(v2.AUTH_FAILED, reason)
                return False
            return True  # a failed refresh keeps the grant it had, and its expiry
        dropped = v2.dropped(grant, socket.subscribed)
        self._end(socket, dropped)
        socket.writer = writer
        self._take(socket, grant)
        await conn.send(v2.auth_ok(action.ref, grant, dropped))
        return True

    def _take(self, socket: _Socket, grant: Grant) -> None:
        """Make `grant` the socket's: counted under its mode, timed to its `exp`."""
        stats = self._stats
        stats.open_by_mode[socket.counted_as] -= 1
        stats.open_by_mode[grant.mode] += 1
        socket.counted_as = grant.mode
        socket.grant = grant
        if socket.writer is None:
            socket.writer = EnvelopeWriter(
                grant.claims, sender=socket.conn.v2_sender, limit=self._config.envelope_limit
            )
        self._stop_timers(socket)
        if grant.expires_at is not None:
            self._expire_later(socket, grant.expires_at)

    def _expire_later(self, socket: _Socket, expires_at: float) -> None:
        """`expiring` PGWS_EXPIRY_WARNING seconds before `exp`, then 3001 at `exp` (SPEC 8)."""
        conn, loop = socket.conn, socket.conn.loop
        left = expires_at - self._clock()
        socket.timers.append(loop.call_later(max(left, 0.0), conn.drop, v2.EXPIRED, "JWT expired"))
        warn_in = max(left - self._config.expiry_warning, 0.0)

        def warn() -> None:
            socket.warning = loop.create_task(self._warn(conn, expires_at), name="v2-expiring")

        socket.timers.append(loop.call_later(warn_in, warn))

    async def _warn(self, conn: Connection, expires_at: float) -> None:
        with contextlib.suppress(ConnectionClosed):
            await conn.send(v2.expiring(expires_at - self._clock()))

    def _stop_timers(self, socket: _Socket) -> None:
        for timer in socket.timers:
            timer.cancel()
        socket.timers.clear()
        if socket.warning is not None:
            socket.warning.cancel()
            socket.warning = None

    def _end(self, socket: _Socket, channels: Sequence[str]) -> None:
        """End these subscriptions."""
        for channel in channels:
            socket.subscribed.pop(channel, None)
        socket.conn.v2_no_echo = socket.conn.v2_no_echo - set(channels)
        self._registry.unsubscribe_v2(socket.conn, channels)
