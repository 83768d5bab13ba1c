"""A small asyncio client for services speaking `pgws.v2` (SPEC 8), on the websockets client.

It connects, authenticates in the first frame, subscribes (with positions for durable channels),
publishes, refreshes its token when the server says `expiring`, and when the connection drops it
reconnects with jittered exponential back-off and subscribes again from the last position it saw
on each channel. Where continuity cannot be kept (a non-durable channel across a reconnect, a
position the server cannot resume from, a server-sent `gap`) it calls `on_gap(channel)`: the
service should reload that channel's state from its source of truth.

    async with Client("ws://localhost:3000/", token) as client:
        await client.subscribe("orders")
        await client.publish("audit", {"seen": True})
        async for message in client:
            handle(message.channel, message.data, message.position)

Only the standard library and websockets are imported, so the module can be copied into a
service that does not install pgws.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import itertools
import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Subprotocol

__all__ = ["AuthFailed", "Client", "Disconnected", "Message", "RequestFailed"]

log = logging.getLogger("pgws.client")

SUBPROTOCOL = Subprotocol("pgws.v2")
# Close codes after which reconnecting with the same token cannot help.
_AUTH_FAILED, _EXPIRED = 4401, 3001
# HTTP statuses at the upgrade after which reconnecting cannot help either (401, 403, 400).
_FINAL_STATUSES = frozenset({400, 401, 403})

TokenSource = str | Callable[[], str | Awaitable[str]]
GapCallback = Callable[[str], object]


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    """One `msg`: its channel, its data (parsed JSON, or the raw text), its position if durable."""

    channel: str
    data: Any
    position: str | None = None


class RequestFailed(Exception):
    """The server answered a request with `err` (SPEC 8 codes; `retry`: it may work later)."""

    def __init__(self, code: int, reason: str, retry: bool) -> None:
        super().__init__(f"{code} {reason}")
        self.code, self.reason, self.retry = code, reason, retry


class AuthFailed(RequestFailed):
    """The token was refused: the client stops (a new token is the caller's to find)."""


class Disconnected(Exception):
    """The connection went away before the reply came: the request may or may not have been
    carried out (a `pub` may have been sent)."""


@dataclasses.dataclass(slots=True)
class _Subscription:
    echo: bool
    position: str | None


class Client:
    """A pgws.v2 connection that stays up: see the module docstring."""

    def __init__(
        self,
        url: str,
        token: TokenSource,
        *,
        on_gap: GapCallback | None = None,
        open_timeout: float = 10.0,
        initial_delay: float = 0.5,
        max_delay: float = 30.0,
        **connect_options: Any,
    ) -> None:
        """`token`: a string, or a function (plain or async) called for a fresh token at each
        connect and on `expiring`. `connect_options` go to websockets' connect()."""
        self.url = url
        self._token = token
        self._on_gap = on_gap
        self._open_timeout = open_timeout
        self._initial_delay, self._max_delay = initial_delay, max_delay
        self._connect_options = connect_options
        self._subscriptions: dict[str, _Subscription] = {}
        self._messages: asyncio.Queue[Message | BaseException] = asyncio.Queue()
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._refs = itertools.count(1)
        self._ws: ClientConnection | None = None
        self._ready = asyncio.Event()
        self._failed: BaseException | None = None
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self.connects = 0  # successful authentications so far (1 + reconnects)

    # --- life cycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        self.start()
        await self.wait_ready()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def start(self) -> None:
        """Connect in the background, and keep connecting until close()."""
        if self._task is None:
            self._task = asyncio.create_task(self._run_forever(), name="pgws-client")

    async def wait_ready(self) -> None:
        """Wait until connected, authenticated and subscribed again; raise what stopped the
        client for good (AuthFailed, or an upgrade refused with 400/401/403)."""
        while not self._ready.is_set():
            if self._failed is not None:
                raise self._failed
            waiter = asyncio.ensure_future(self._ready.wait())
            assert self._task is not None, "start() the client first"  # noqa: S101
            await asyncio.wait({waiter, self._task}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if self._task.done() and self._failed is None:
                raise Disconnected("the client was closed")

    async def close(self) -> None:
        """Close the connection (1000) and stop reconnecting."""
        self._closing = True
        if self._ws is not None:
            await self._ws.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._background):
            task.cancel()
        self._messages.put_nowait(Disconnected("the client was closed"))

    # --- requests ---------------------------------------------------------------------------

    async def subscribe(
        self, channel: str, *, echo: bool = True, position: str | None = None
    ) -> dict[str, Any]:
        """Subscribe to `channel` (from `position` when given: replay, or `on_gap` when the
        server cannot resume from it); the client resubscribes by itself after reconnects."""
        await self.wait_ready()
        reply = await self._request(self._sub_request(channel, echo, position))
        self._subscriptions[channel] = _Subscription(echo, position)
        if position is not None and reply.get("recovered") is False:
            self._gap(channel)
        return reply

    async def unsubscribe(self, channel: str) -> None:
        """Stop reading `channel`."""
        self._subscriptions.pop(channel, None)
        await self.wait_ready()
        with contextlib.suppress(RequestFailed):  # 409: a reconnect did not resubscribe it
            await self._request({"op": "unsub", "ch": channel})

    async def publish(self, channel: str, data: Any) -> str | None:
        """Publish `data` (any JSON value) to one channel; the message's position when the
        channel is durable. Raises RequestFailed (`retry` on 503) or Disconnected."""
        await self.wait_ready()
        reply = await self._request({"op": "pub", "ch": channel, "data": data})
        position = reply.get("pos")
        return position if isinstance(position, str) else None

    async def refresh(self, token: str | None = None) -> dict[str, Any]:
        """Send a new token (or one from the token function): the grant and `exp` are replaced
        without a reconnect; channels the new token does not cover are dropped."""
        await self.wait_ready()
        reply = await self._request({"op": "auth", "token": token or await self._fresh_token()})
        for channel in reply.get("dropped") or ():
            self._subscriptions.pop(channel, None)
        return reply

    async def ping(self) -> None:
        """A round trip to the server."""
        await self.wait_ready()
        await self._request({"op": "ping"})

    # --- messages ---------------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        item = await self._messages.get()
        if isinstance(item, Disconnected) and self._closing:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    @property
    def closed(self) -> bool:
        """Whether close() was called."""
        return self._closing

    def positions(self) -> dict[str, str | None]:
        """The last position seen on each subscribed channel (None: none yet, or not durable)."""
        return {channel: sub.position for channel, sub in self._subscriptions.items()}

    # --- the connection ---------------------------------------------------------------------

    async def _run_forever(self) -> None:
        attempt = 0
        while not self._closing:
            try:
                async with connect(
                    self.url,
                    subprotocols=[SUBPROTOCOL],
                    open_timeout=self._open_timeout,
                    **self._connect_options,
                ) as ws:
                    self._ws = ws
                    await self._session(ws)
                    attempt = 0
            except AuthFailed as exc:
                self._fail(exc)
                return
            except InvalidStatus as exc:
                status = exc.response.status_code
                if status in _FINAL_STATUSES:
                    reason = exc.response.body.decode(errors="replace").strip()
                    self._fail(AuthFailed(status, reason, False))
                    return
            except (OSError, InvalidHandshake, ConnectionClosed, TimeoutError, Disconnected) as exc:
                log.info("pgws_client_disconnected: %s", exc)
            finally:
                self._ws = None
                self._ready.clear()
                self._fail_pending(Disconnected("the connection went away"))
            if self.closed:
                return
            # Full jitter (AWS): many clients of one restarted server do not come back at once.
            ceiling = min(self._max_delay, self._initial_delay * 2**attempt)
            delay = random.uniform(0, ceiling)  # noqa: S311 (not for secrets)
            attempt = min(attempt + 1, 30)
            await asyncio.sleep(delay)

    async def _session(self, ws: ClientConnection) -> None:
        """Authenticate, subscribe again from the last positions, then read until closed."""
        if ws.subprotocol != SUBPROTOCOL:
            raise AuthFailed(400, "the server did not select pgws.v2", False)
        reader = asyncio.create_task(self._read_forever(ws), name="pgws-client-reader")
        # Replies still awaited when the connection goes can never come.
        reader.add_done_callback(lambda _: self._fail_pending(Disconnected("connection lost")))
        try:
            try:
                await self._request({"op": "auth", "token": await self._fresh_token()})
            except RequestFailed as exc:
                raise AuthFailed(exc.code, exc.reason, exc.retry) from None
            for channel, sub in list(self._subscriptions.items()):
                await self._resubscribe(channel, sub)
            self.connects += 1
            self._ready.set()
            with contextlib.suppress(ConnectionClosed):
                await reader
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await reader
        code = ws.close_code
        if code == _AUTH_FAILED or (code == _EXPIRED and isinstance(self._token, str)):
            raise AuthFailed(401, ws.close_reason or "token refused", False)

    async def _resubscribe(self, channel: str, sub: _Subscription) -> None:
        """After a reconnect: `sub` again, from the last position seen when there is one."""
        try:
            reply = await self._request(self._sub_request(channel, sub.echo, sub.position))
        except RequestFailed as exc:
            if exc.retry:  # 503: the database cannot say where to resume; try again later
                raise Disconnected(f"resubscribing {channel}: {exc}") from None
            log.warning("pgws_client_subscription_dropped: %s: %s", channel, exc)
            self._subscriptions.pop(channel, None)  # the new token no longer grants it
            return
        if sub.position is None or reply.get("recovered") is False:
            # Nothing to resume from, or not exactly: what was sent meanwhile is lost.
            self._gap(channel)

    async def _read_forever(self, ws: ClientConnection) -> None:
        async for frame in ws:
            try:
                reply = json.loads(frame)
            except ValueError:
                continue
            if not isinstance(reply, dict):
                continue
            op = reply.get("op")
            if op == "msg":
                self._deliver(reply)
            elif op == "gap" and isinstance(reply.get("ch"), str):
                sub = self._subscriptions.get(reply["ch"])
                if sub is not None:
                    sub.position = None
                self._gap(reply["ch"])
            elif op == "expiring" and not isinstance(self._token, str):
                self._spawn(self._refresh_quietly())
            elif op in ("ok", "err", "pong"):
                future = self._pending.pop(reply.get("ref"), None)  # type: ignore[arg-type]
                if future is not None and not future.done():
                    future.set_result(reply)

    def _deliver(self, frame: dict[str, Any]) -> None:
        channel, position = frame.get("ch"), frame.get("pos")
        if not isinstance(channel, str):
            return
        position = position if isinstance(position, str) else None
        sub = self._subscriptions.get(channel)
        if sub is not None and position is not None:
            sub.position = position
        self._messages.put_nowait(Message(channel, frame.get("data"), position))

    async def _request(self, fields: dict[str, Any]) -> dict[str, Any]:
        ws = self._ws
        if ws is None:
            raise Disconnected("not connected")
        ref = next(self._refs)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[ref] = future
        try:
            await ws.send(json.dumps({**fields, "ref": ref}))
            reply = await future
        except ConnectionClosed:
            raise Disconnected("the connection went away") from None
        finally:
            self._pending.pop(ref, None)
        if reply.get("op") == "err":
            raise RequestFailed(
                int(reply.get("code", 0)), str(reply.get("reason", "")), bool(reply.get("retry"))
            )
        return reply

    @staticmethod
    def _sub_request(channel: str, echo: bool, position: str | None) -> dict[str, Any]:
        request: dict[str, Any] = {"op": "sub", "ch": channel}
        if not echo:
            request["echo"] = False
        if position is not None:
            request["from"] = position
        return request

    async def _fresh_token(self) -> str:
        if isinstance(self._token, str):
            return self._token
        token = self._token()
        if inspect.isawaitable(token):
            token = await token
        return str(token)

    async def _refresh_quietly(self) -> None:
        """On `expiring`: a new token from the token function; failing that, the server closes
        with 3001 at `exp` and the client reconnects with the next token it gets."""
        try:
            await self.refresh()
        except (RequestFailed, Disconnected) as exc:
            log.warning("pgws_client_refresh_failed: %s", exc)

    def _gap(self, channel: str) -> None:
        if self._on_gap is None:
            return
        try:
            result = self._on_gap(channel)
        except Exception:  # the caller's bug must not cost the connection (and a reconnect)
            log.exception("pgws_client_gap_callback_failed")
            return
        if inspect.isawaitable(result):
            self._spawn(result)

    def _spawn(self, awaitable: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(awaitable)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _fail(self, exc: BaseException) -> None:
        self._failed = exc
        self._messages.put_nowait(exc)

    def _fail_pending(self, exc: BaseException) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(exc)
        self._pending.clear()
