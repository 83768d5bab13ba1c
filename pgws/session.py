"""One accepted socket, from open to close: it runs the legacy protocol's actions.

A reading socket is subscribed to its channels in the registry and receives notifications
through `pgws.fanout`; a writing socket's frames become the envelopes the protocol
builds, one NOTIFY each. The session also owns the expiry timer, the meta-channel events and
the open-socket count that PGWS_MAX_CONNECTIONS reads.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Sequence
from typing import cast

import structlog
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from pgws.claims import Grant, Verifier
from pgws.config import Config
from pgws.connection import Connection, SocketStats, peer
from pgws.durable_bus import DurableBus
from pgws.envelope import EnvelopeWriter
from pgws.errors import MessageRefused, MessageTooBig
from pgws.protocols import legacy
from pgws.publisher import PUBLISHER
from pgws.registry import Registry
from pgws.session_v2 import V2Sessions

# Socket events keep the logger name they had before the split, which log filters may select on.
log = structlog.get_logger("pgws.handler")

# NOTIFYs one writing socket may have in flight at once. Each is still its own transaction, and
# they go down one sender connection in order (PUBLISHER); the socket reads its next frame while
# they travel instead of waiting for each answer, so 10 writers keep 80 NOTIFYs in flight.
WINDOW = 8


class Sessions:
    """Runs each accepted socket until it closes (websockets' connection handler)."""

    def __init__(
        self,
        config: Config,
        registry: Registry[ServerConnection],
        stats: SocketStats,
        *,
        verifier: Callable[[], Verifier] | None = None,
        clock: Callable[[], float] = time.time,
        durable: DurableBus | None = None,
    ) -> None:
        self._config = config
        self._registry = registry
        self._stats = stats
        self._clock = clock
        self._durable = durable
        self._v2 = (
            None
            if verifier is None
            else V2Sessions(config, registry, stats, verifier, clock, durable=durable)
        )

    async def handle(self, ws: ServerConnection) -> None:
        """Run one accepted socket until it closes."""
        conn = cast(Connection, ws)
        if conn.v2 and self._v2 is not None:
            await self._v2.handle(conn)
            return
        grant, stats = conn.grant, self._stats
        conn.opened_at = self._clock()
        structlog.contextvars.bind_contextvars(conn_id=str(ws.id)[:8])
        PUBLISHER.set(conn)  # this task's context: its NOTIFYs stay in order
        log.info(
            "client_connected", remote=peer(ws), channels=list(grant.channels), mode=grant.mode
        )
        seen = 0
        expiry = None
        # Counted here and uncounted first thing in the `finally` below, nothing between that can
        # raise: PGWS_MAX_CONNECTIONS reads this count, and a leak would lock everyone out (503).
        stats.open_by_mode[grant.mode] += 1
        try:
            if grant.can_read:
                self._registry.subscribe(ws, grant.channels)
                seen = self._registry.published(grant.channels)
            expiry = self._expire_later(conn)
            if grant.can_read and self._durable is not None:
                await self._durable.until_following(grant.channels)  # live before frames are read
            await self._announce(conn.writer, "ConnectionOpen", grant)
            await self._receive_forever(conn)
        except MessageRefused as exc:
            await self._refuse(conn, exc)
        except ConnectionClosed:
            pass
        except Exception:  # the task boundary: a bug costs this socket, never the server
            log.exception("handler_crashed")
            await ws.close(1011, "internal error")
        finally:
            stats.open_by_mode[grant.mode] -= 1  # first: nothing below may skip it
            if expiry is not None:
                expiry.cancel()
            self._disconnected(conn, seen)
        await self._announce(conn.writer, "ConnectionClose", grant)

    def _expire_later(self, conn: Connection) -> asyncio.TimerHandle | None:
        """Close 3001 when the token's `exp` passes (SPEC 3: expiry)."""
        expires_at = conn.grant.expires_at
        if expires_at is None:
            return None
        delay = expires_at - self._clock()
        return conn.loop.call_later(max(delay, 0.0), conn.drop, legacy.EXPIRED, "JWT expired")

    async def _receive_forever(self, conn: Connection) -> None:
        """Read frames and carry out what the protocol makes of each, until the socket closes."""
        # A list, not a deque: at most WINDOW long, and an idle reader's costs 56 bytes, not 600.
        in_flight: list[asyncio.Task[None]] = []
        try:
            async for frame in conn:
                conn.frames_in += 1
                self._stats.frames_in += 1
                if conn.dropped:
                    break
                actions = legacy.receive(conn.grant, conn.writer, frame, self._clock())
                if not await self._execute(conn, actions, in_flight):
                    break
            if conn.dropped:
                await conn.wait_closed()  # within DROP_GRACE: the close code is then known
        finally:
            # What the socket sent before it went is still sent; the first failure is raised.
            while in_flight:
                await in_flight.pop(0)

    def _publish(
        self,
        conn: Connection,
        envelope: str,
        channel: str,
        in_flight: list[asyncio.Task[None]],
    ) -> None:
        """Start one NOTIFY (or durable store) without waiting for it (at most WINDOW are in
        flight); tasks start in the order made, which keeps this socket's order."""
        task = conn.loop.create_task(self._send(envelope, channel))
        task.add_done_callback(functools.partial(_published, conn))
        in_flight.append(task)

    async def _send(self, envelope: str, channel: str) -> None:
        await self._registry.publish_out(envelope, channel)  # a legacy writer gets no position

    async def _execute(
        self,
        conn: Connection,
        actions: Sequence[legacy.Action],
        in_flight: list[asyncio.Task[None]],
    ) -> bool:
        """Carry out one frame's actions in order; False once the socket is being closed."""
        for action in actions:
            if conn.dropped:  # RFC 6455 7.1.7: nothing more is processed after a drop
                return False
            match action:
                case legacy.Publish():
                    self._publish(conn, action.envelope, action.channel, in_flight)
                    # A failure raises here (MessageRefused: the socket is closed with its code).
                    while in_flight and (len(in_flight) >= WINDOW or in_flight[0].done()):
                        await in_flight.pop(0)
                case legacy.Ignore():
                    # SPEC 3: read-only sockets' frames are read and dropped, up to a budget.
                    if conn.read_only_budget_spent(action.size):
                        self._close_flooding(conn)
                        return False
                case legacy.Close() | legacy.Refuse():
                    await self._close(conn, action)
                    return False
        return True

    async def _close(self, conn: Connection, action: legacy.Close | legacy.Refuse) -> None:
        """Close the socket as the protocol asked: refused, failed at once, or the usual way."""
        if isinstance(action, legacy.Refuse):
            await self._refuse(conn, action.error)
        elif action.at_once:
            conn.drop(action.code, action.reason)
        else:
            await conn.close(action.code, action.reason)

    async def _refuse(self, conn: Connection, exc: MessageRefused) -> None:
        """A frame that cannot become a NOTIFY closes its socket with the error's code."""
        if isinstance(exc, MessageTooBig):
            self._stats.too_big += 1
        log.info("envelope_rejected", reason=str(exc), code=exc.close_code)
        await conn.close(exc.close_code, str(exc))

    def _close_flooding(self, conn: Connection) -> None:
        """A read-only socket sent more than it may: everything it sends is read for nothing."""
        self._stats.read_only_floods += 1
        log.info("client_flooding", frames_in=conn.frames_in, mode=conn.grant.mode)
        conn.drop(1008, "read-only socket")

    def _disconnected(self, conn: Connection, seen: int) -> None:
        """Unsubscribe a reader and log the socket's summary line."""
        grant = conn.grant
        messages_out = 0
        if grant.can_read:
            messages_out = self._registry.published(grant.channels) - seen
            self._registry.unsubscribe(conn, grant.channels)
        log.info(
            "client_disconnected",
            code=conn.close_code,
            reason=conn.close_reason,
            frames_in=conn.frames_in,
            messages_out=messages_out,
            seconds=round(self._clock() - conn.opened_at, 3),
        )

    async def _announce(self, writer: EnvelopeWriter, event: str, grant: Grant) -> None:
        """Tell readers of the meta channel that a socket opened or closed (SPEC 3)."""
        meta = self._config.meta_channel
        if meta is None:
            return
        envelope = writer.build(event, meta, ",".join(grant.channels), self._clock())
        try:
            await self._registry.publish_out(envelope, meta)
        except MessageRefused as exc:
            log.warning("meta_event_failed", meta_event=event, error=str(exc))


def _published(conn: Connection, task: asyncio.Task[None]) -> None:
    """A NOTIFY the database did not take closes its socket at once with the reason, even when
    the socket sends nothing more (the session raises the same error when it reaches it)."""
    if task.cancelled():
        return
    exc = task.exception()  # retrieved here, whatever happens to the task later
    if isinstance(exc, MessageRefused) and not conn.dropped:
        conn.drop(exc.close_code, str(exc))
