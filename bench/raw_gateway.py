"""A minimal gateway: the baseline that pgws is measured against.

It does what pgws does on the hot paths and nothing else: one psycopg connection LISTENs, each
notification's routing channel is found with orjson and the raw text goes out once to every
reader of that channel with `websockets.broadcast()`; frames from writer sockets become
envelopes sent by pipelined NOTIFY connections. Tokens are verified like pgws verifies them
(HS256 with python-jose, the same URL forms and claims), so handshakes compare like with like.
No compression, no logging per message, no reconnects, no metrics, no static files.

It reads the same environment as `pgws serve` (PGWS_DB_URI, PGWS_JWT_SECRET, PGWS_HOST,
PGWS_PORT, PGWS_LISTEN_CHANNEL) and logs `server_started` as a JSON line on stderr.

    python -m bench.raw_gateway [--send-loop] [--loop asyncio] [--senders 2] [--hmac]

`--hmac` checks the HS256 token with `hmac` directly instead of python-jose (signature, `alg`,
`exp`, `nbf`): the least a token check can cost, the baseline for handshakes/s.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import dataclasses
import hashlib
import hmac
import itertools
import json
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import unquote

import orjson
import psycopg
from jose import jwt
from jose.exceptions import ExpiredSignatureError, JWTError
from psycopg import sql
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from bench.pgraw import PipelinedNotifier
from bench.wire import raise_nofile_limit

_MAX_IN_FLIGHT = 1000  # per sender connection; a writer waits beyond this


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """What the gateway needs, from the same variables as `pgws serve`."""

    db_uri: str = dataclasses.field(repr=False)
    secret: str = dataclasses.field(repr=False)
    host: str
    port: int
    listen_channel: str
    senders: int
    send_loop: bool
    hmac_tokens: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str], args: argparse.Namespace) -> Settings:
        """Read the PGWS_* variables; the options come from the command line."""
        host = env.get("PGWS_HOST", "127.0.0.1")
        return cls(
            db_uri=env["PGWS_DB_URI"],
            secret=env["PGWS_JWT_SECRET"],
            host="0.0.0.0" if host == "*4" else host,  # noqa: S104  # SPEC: *4 = all IPv4
            port=int(env.get("PGWS_PORT", "3000")),
            listen_channel=env.get("PGWS_LISTEN_CHANNEL", "postgres-websockets-listener"),
            senders=args.senders,
            send_loop=args.send_loop,
            hmac_tokens=args.hmac,
        )


@dataclasses.dataclass(frozen=True)
class Grant:
    """What a verified token allows on one socket."""

    channels: frozenset[str]
    mode: str
    claims: dict[str, Any]


class Connection(ServerConnection):
    """A server connection that carries its grant from the token check to the handler."""

    grant: Grant


def log(event: str, **fields: Any) -> None:
    """One JSON line on stderr (lifecycle events only)."""
    print(json.dumps({"event": event, **fields}), file=sys.stderr, flush=True)


class Gateway:
    """Routing table, token check, per-socket handler and the LISTEN loop."""

    def __init__(self, settings: Settings, notifiers: Sequence[PipelinedNotifier]) -> None:
        self.settings = settings
        self.readers: dict[str, set[ServerConnection]] = {}
        self.notifiers = notifiers
        self._next_notifier = itertools.cycle(notifiers)
        self._listen = settings.listen_channel.encode()
        self._secret = settings.secret.encode()

    def check_token(self, ws: ServerConnection, request: Request) -> Response | None:
        """Verify the token and the channels before the upgrade, as pgws does."""
        parts = [unquote(part) for part in request.path.split("?", 1)[0].strip("/").split("/")]
        if len(parts) > 2 or not parts[-1]:
            return ws.respond(HTTPStatus.BAD_REQUEST, "bad request\n")
        channel, token = (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])
        try:
            if self.settings.hmac_tokens:
                claims = hs256_claims(token, self._secret)
            else:
                claims = jwt.decode(token, self.settings.secret, algorithms=["HS256"])
        except ExpiredSignatureError:
            return ws.respond(HTTPStatus.UNAUTHORIZED, "token expired\n")
        except JWTError:
            return ws.respond(HTTPStatus.UNAUTHORIZED, "invalid token\n")
        mode = claims.get("mode")
        if mode not in ("r", "w", "rw"):
            return ws.respond(HTTPStatus.FORBIDDEN, "missing mode\n")
        allowed = {name for name in claims.get("channels") or [] if isinstance(name, str)}
        if isinstance(claims.get("channel"), str):
            allowed.add(claims["channel"])
        if channel is not None:
            if allowed and channel not in allowed:
                return ws.respond(HTTPStatus.FORBIDDEN, f"not allowed: {channel}\n")
            allowed = {channel}
        elif not allowed:
            return ws.respond(HTTPStatus.FORBIDDEN, "no channels\n")
        cast(Connection, ws).grant = Grant(frozenset(allowed), mode, claims)
        return None

    async def handle(self, ws: ServerConnection) -> None:
        """Register readers; turn each frame from a writer into NOTIFYs."""
        grant = cast(Connection, ws).grant
        reads, writes = "r" in grant.mode, "w" in grant.mode
        if reads:
            for channel in grant.channels:
                self.readers.setdefault(channel, set()).add(ws)
        try:
            async for message in ws:
                if writes:
                    text = message if isinstance(message, str) else message.decode(errors="replace")
                    for channel in grant.channels:
                        await self.publish(channel, text, grant.claims)
        except ConnectionClosed:
            pass
        finally:
            if reads:
                for channel in grant.channels:
                    self.readers[channel].discard(ws)

    async def publish(self, channel: str, text: str, claims: dict[str, Any]) -> None:
        """Send one envelope as its own NOTIFY transaction, waiting only if far behind."""
        envelope = orjson.dumps(
            {
                "event": "WebsocketMessage",
                "channel": channel,
                "payload": text,
                "claims": {**claims, "message_delivered_at": time.time()},
            }
        )
        notifier = next(self._next_notifier)
        notifier.send(self._listen, envelope)
        if notifier.in_flight > _MAX_IN_FLIGHT:
            await notifier.wait_below(_MAX_IN_FLIGHT // 2, within=30)

    async def listen_forever(self) -> None:
        """LISTEN and fan each notification out to the readers of its channel."""
        listen = sql.SQL("LISTEN {}").format(sql.Identifier(self.settings.listen_channel))
        readers = self.readers
        fallback = self.settings.listen_channel
        async with await psycopg.AsyncConnection.connect(
            self.settings.db_uri, autocommit=True
        ) as conn:
            await conn.execute(listen)
            log("listener_connected", backend_pid=conn.info.backend_pid)
            async for notify in conn.notifies():
                payload = notify.payload
                try:
                    parsed = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    parsed = None
                channel = parsed.get("channel") if isinstance(parsed, dict) else None
                sockets = readers.get(channel if isinstance(channel, str) else fallback)
                if not sockets:
                    continue
                if self.settings.send_loop:
                    for ws in list(sockets):
                        with contextlib.suppress(ConnectionClosed):
                            await ws.send(payload)
                else:
                    broadcast(sockets, payload)


def _b64url(segment: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise JWTError("bad base64") from None


def hs256_claims(token: str, secret: bytes) -> dict[str, Any]:
    """An HS256 token's claims, checked with hmac directly: signature, alg, exp and nbf."""
    signing_input, _, signature = token.rpartition(".")
    header_segment, _, payload_segment = signing_input.partition(".")
    expected = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(_b64url(signature), expected):
        raise JWTError("signature")
    try:
        header = json.loads(_b64url(header_segment))
        claims = json.loads(_b64url(payload_segment))
    except ValueError:
        raise JWTError("not JSON") from None
    if not isinstance(header, dict) or header.get("alg") != "HS256" or not isinstance(claims, dict):
        raise JWTError("not an HS256 JWT")
    now = time.time()
    if isinstance(claims.get("exp"), int | float) and now >= claims["exp"]:
        raise ExpiredSignatureError("expired")
    if isinstance(claims.get("nbf"), int | float) and now < claims["nbf"]:
        raise JWTError("not yet valid")
    return claims


async def run(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    notifiers = [await PipelinedNotifier.open(settings.db_uri) for _ in range(settings.senders)]
    gateway = Gateway(settings, notifiers)
    try:
        async with (
            serve(
                gateway.handle,
                settings.host,
                settings.port,
                process_request=gateway.check_token,
                create_connection=Connection,
                compression=None,
                ping_interval=30,
                ping_timeout=30,
            ) as server,
            asyncio.TaskGroup() as group,
        ):
            listener = group.create_task(gateway.listen_forever(), name="listener")
            port = server.sockets[0].getsockname()[1] if server.sockets else settings.port
            log("server_started", port=port, pid=os.getpid())
            await stop.wait()
            log("server_stopping")
            listener.cancel()
    finally:
        for notifier in notifiers:
            await notifier.close()
    log("server_stopped")


def main(argv: Sequence[str] | None = None) -> None:
    """Parse options, raise the descriptor limit and serve."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--send-loop", action="store_true", help="await send() per socket instead of broadcast()"
    )
    parser.add_argument("--senders", type=int, default=2, help="pipelined NOTIFY connections")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument(
        "--hmac", action="store_true", help="check tokens with hmac directly, not python-jose"
    )
    args = parser.parse_args(argv)
    settings = Settings.from_env(os.environ, args)
    raise_nofile_limit(65536)
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(run(settings))
    else:
        asyncio.run(run(settings))


if __name__ == "__main__":
    main()
