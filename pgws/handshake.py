"""The WebSocket upgrade: who gets in, decided in websockets' process_request.

A request that is not an upgrade goes to the plain-HTTP routes, except `GET /events`
(SPEC 9), which passes the same origin and capacity checks and then pgws.sse's. An upgrade
passes the origin and capacity checks, then its token (from the path, `Authorization: Bearer`,
or a JWT-shaped Sec-WebSocket-Protocol offer) becomes a Grant; the grant and its envelope writer
ride on the connection to the session. Any refusal is an HTTP error, counted and logged here.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from http import HTTPStatus
from typing import cast

import structlog
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from pgws import web
from pgws.buffers import BufferLedger
from pgws.claims import (
    Grant,
    Verifier,
    authorize,
    grant_for_v2,
)
from pgws.config import Config
from pgws.connection import Connection, SocketStats, peer
from pgws.envelope import EnvelopeWriter
from pgws.errors import BadRequest, Forbidden, HandshakeRefused, KeyUnknown, ServiceUnavailable
from pgws.paths import parse_channel_path, parse_path
from pgws.protocols.v2 import SUBPROTOCOL as V2
from pgws.proxies import TrustedProxies
from pgws.sse_request import is_events_request
from pgws.tokens import token_shaped

# Socket events keep the logger name they had before the split, which log filters may select on.
log = structlog.get_logger("pgws.handler")


class Handshake:
    """Authorizes upgrades (websockets' process_request); other requests go to `plain`."""

    def __init__(
        self,
        config: Config,
        verifier: Verifier,
        stats: SocketStats,
        buffers: BufferLedger,
        *,
        plain: Callable[[Request], Response],
        clock: Callable[[], float] = time.time,
        events: Callable[[Request, Verifier], Response] | None = None,
    ) -> None:
        self._config = config
        self.verifier = verifier  # replaced on SIGHUP; sockets already open keep their grant
        self._stats = stats
        self._buffers = buffers
        self._plain = plain
        self._clock = clock
        self._proxies = TrustedProxies(config.trusted_proxies)
        self._events = events  # GET /events (SPEC 9): checked here like an upgrade

    def check_request(
        self, connection: ServerConnection, request: Request, *, may_wait: bool = True
    ) -> Response | Awaitable[Response | None] | None:
        """websockets' process_request: plain HTTP, a refused handshake, or None to upgrade.

        Answered at once, except for a token whose `kid` the JWKS lacks: then an awaitable
        that waits (bounded) for the refetch that asked for and checks the request again.
        """
        self._note_client(connection, request)  # first: every refusal's log line names it
        try:
            if not wants_websocket(request):
                if self._events is None or not is_events_request(request):
                    return self._plain(request)
                self._check_origin(request)
                self._check_capacity()
                return self._events(request, self.verifier)
            self._check_origin(request)
            self._check_capacity()
            if V2 in _offered_subprotocols(request):
                self._accept_v2(connection, request)
                return None
            grant = authorize(
                self.verifier,
                request.path,
                self._clock(),
                header_token=token_from_headers(request),
                max_channels=self._config.max_channels,
            )
            writer = _envelope_writer(grant, self._config.envelope_limit)
        except KeyUnknown as exc:
            if may_wait:
                return self._after_refetch(connection, request, exc)
            return self._refuse(connection, exc)
        except HandshakeRefused as exc:
            return self._refuse(connection, exc)
        conn = cast(Connection, connection)
        conn.grant, conn.writer = grant, writer
        conn.stats = self._stats
        if self._buffers.limit is not None:
            conn.ledger = self._buffers
        return None

    def _refuse(self, connection: ServerConnection, exc: HandshakeRefused) -> Response:
        self._stats.rejected[_reason_label(exc)] += 1
        log.info("client_rejected", status=exc.status, reason=str(exc), remote=peer(connection))
        return web.text(HTTPStatus(exc.status), str(exc))

    async def _after_refetch(
        self, connection: ServerConnection, request: Request, unknown: KeyUnknown
    ) -> Response | None:
        await unknown.refetched()
        answer = self.check_request(connection, request, may_wait=False)
        return None if answer is None else cast(Response, answer)

    def _accept_v2(self, connection: ServerConnection, request: Request) -> None:
        """A `pgws.v2` upgrade (SPEC 8): a token is optional here (else the first frame is `auth`);
        one that is given must verify, and a path channel must be granted, though it is not
        subscribed. Refusals raise HandshakeRefused, answered like SPEC 2's."""
        token = token_from_headers(request)
        if token is not None:
            requested = parse_channel_path(request.path)
        elif _last_segment(request.path) and token_shaped(_last_segment(request.path)):
            requested, token = parse_path(request.path)
        else:
            requested = parse_channel_path(request.path)
        grant = None
        if token is not None:
            grant = grant_for_v2(self.verifier.verify(token, self._clock()))
            if requested is not None and not grant.allows(requested):
                raise Forbidden(f"not allowed: {requested}")
            # Claims it cannot carry are a 403 here, as for legacy.
            _envelope_writer(grant, self._config.envelope_limit)
        conn = cast(Connection, connection)
        conn.v2, conn.v2_grant = True, grant
        conn.stats = self._stats
        if self._buffers.limit is not None:
            conn.ledger = self._buffers

    def trust(self, networks: tuple[str, ...]) -> None:
        """SIGHUP: the proxies new handshakes may be told the client's address by."""
        self._proxies = TrustedProxies(networks)

    def _note_client(self, connection: ServerConnection, request: Request) -> None:
        """PGWS_TRUSTED_PROXIES: the client address a trusted proxy forwards, for `peer()`."""
        if not self._proxies:
            return
        try:
            host = str(connection.remote_address[0])
        except (AttributeError, OSError, TypeError, IndexError):
            return
        client = self._proxies.client(
            host,
            request.headers.get_all("Forwarded"),
            request.headers.get_all("X-Forwarded-For"),
        )
        if client is not None:
            cast(Connection, connection).forwarded_client = client

    def _check_origin(self, request: Request) -> None:
        """PGWS_ALLOWED_ORIGINS: browsers elsewhere are refused (clients sending none are not)."""
        allowed = self._config.allowed_origins
        if allowed is None:
            return
        origins = request.headers.get_all("Origin")
        if origins and any(origin.strip().lower().rstrip("/") not in allowed for origin in origins):
            raise Forbidden("origin not allowed")

    def _check_capacity(self) -> None:
        limit = self._config.max_connections
        if limit is not None and sum(self._stats.open_by_mode.values()) >= limit:
            raise ServiceUnavailable("too many connections")


def wants_websocket(request: Request) -> bool:
    """Whether the request asks to upgrade to WebSocket; raises BadRequest when ambiguous.

    Upgrade is a list (RFC 9110 7.8): `websocket, h2c` offers both and the server picks one, so
    it is an upgrade, not a static-file request. websockets' handshake accepts only a lone
    `websocket`, so the header is narrowed to the protocol picked. Two Upgrade lines are refused.
    """
    lines = request.headers.get_all("Upgrade")
    offered = [item.strip().lower() for line in lines for item in line.split(",") if item.strip()]
    if "websocket" not in offered:
        return False
    if len(lines) > 1:
        raise BadRequest("bad request: more than one Upgrade header")
    if offered != ["websocket"]:
        del request.headers["Upgrade"]
        request.headers["Upgrade"] = "websocket"
    return True


def _envelope_writer(grant: Grant, limit: Callable[[str], int]) -> EnvelopeWriter:
    """The socket's envelope writer, built before the upgrade: claims it cannot carry are a 403."""
    try:
        return EnvelopeWriter(grant.claims, limit=limit)
    except (TypeError, ValueError, RecursionError):
        raise Forbidden("invalid claims: they cannot be serialised") from None


def token_from_headers(request: Request) -> str | None:
    """A token sent outside the URL: `Authorization: Bearer <jwt>`, or a JWT-shaped value of
    Sec-WebSocket-Protocol (what browsers can send). URLs end up in proxy logs; headers less so.
    """
    for value in request.headers.get_all("Authorization"):
        scheme, _, credentials = value.strip().partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    for offered in _offered_subprotocols(request):
        if token_shaped(offered):
            return offered
    return None


def select_subprotocol(
    connection: ServerConnection, offered: Sequence[Subprotocol]
) -> Subprotocol | None:
    """websockets' select_subprotocol: answer a token-carrying offer, as browsers require.

    `new WebSocket(url, ["jwt", token])` gets "jwt" back; `new WebSocket(url, [token])` gets its
    own value back. Offers without a token negotiate nothing. `pgws.v2` is selected whenever it
    is offered (SPEC 8), with or without a token beside it.
    """
    if V2 in offered:
        return Subprotocol(V2)
    if not any(token_shaped(value) for value in offered):
        return None
    if "jwt" in offered:
        return Subprotocol("jwt")
    return next(value for value in offered if token_shaped(value))


def _offered_subprotocols(request: Request) -> list[str]:
    return [
        item.strip()
        for header in request.headers.get_all("Sec-WebSocket-Protocol")
        for item in header.split(",")
        if item.strip()
    ]


def _last_segment(path: str) -> str:
    return path.split("?", 1)[0].split("#", 1)[0].rstrip("/").rpartition("/")[2]


def _reason_label(exc: HandshakeRefused) -> str:
    """A bounded label for the rejection metric (reasons can hold channel names)."""
    text = str(exc)
    for prefix in (
        "not allowed",
        "bad request",
        "too many channels",
        "invalid channel claim",
        "invalid claims",
        "not acceptable",  # GET /events (SPEC 9)
        "method not allowed",
    ):
        if text.startswith(prefix):
            return prefix.replace(" ", "_")
    return text.replace(" ", "_")
