"""PGWS_METRICS=host:port: a plain-HTTP listener of its own that serves /metrics and nothing else.

It keeps the scrape off the public WebSocket port (bind it to loopback or a private network). One
request per connection, answered and closed; the request head is bounded in size and time, so a
client that connects and says nothing, or too much, costs a few kilobytes for a few seconds.
GET and HEAD /metrics get the exposition; other methods on it 405; every other path 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from http import HTTPStatus

import structlog

from pgws import web

log = structlog.get_logger("pgws.metrics")

# A scraper's request is a few hundred bytes; anything this long is not one.
MAX_REQUEST_HEAD = 8 * 1024
# Time a client has to send its request, and then to take the answer.
REQUEST_TIMEOUT = 10.0


class MetricsListener:
    """Serves `render()` at /metrics on `sock` while `serve()` runs."""

    def __init__(self, sock: socket.socket, render: Callable[[], tuple[bytes, str]]) -> None:
        self._sock = sock
        self._render = render
        self.server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        """The bound TCP port (useful with port 0)."""
        return int(self._sock.getsockname()[1])

    async def start(self) -> None:
        """Accept scrapes from now on."""
        self.server = await asyncio.start_server(
            self._answer, sock=self._sock, limit=MAX_REQUEST_HEAD
        )

    async def close(self) -> None:
        """Stop accepting and end the connections still open."""
        if self.server is not None:
            self.server.close()
            for writer in list(self._open):
                writer.transport.abort()
            await self.server.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open.add(writer)
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
                writer.write(self.response(head))
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # gone, silent or not HTTP: nothing worth an answer or a log line
        except ConnectionError:
            pass
        finally:
            self._open.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    await writer.wait_closed()

    def response(self, head: bytes) -> bytes:
        """The serialized answer to one request head."""
        method, path = _request_line(head)
        if method is None:
            return web.text(HTTPStatus.BAD_REQUEST, "bad request\n").serialize()
        if path.split("?", 1)[0] != "/metrics":
            return web.text(HTTPStatus.NOT_FOUND, "not found\n", head=method == "HEAD").serialize()
        if method not in ("GET", "HEAD"):
            return web.respond(
                HTTPStatus.METHOD_NOT_ALLOWED,
                b"method not allowed\n",
                "text/plain; charset=utf-8",
                extra={"Allow": "GET, HEAD"},
            ).serialize()
        body, media_type = self._render()
        return web.respond(HTTPStatus.OK, body, media_type, head=method == "HEAD").serialize()


def _request_line(head: bytes) -> tuple[str | None, str]:
    """(method, target) of an HTTP/1.x request head; (None, "") when it is not one."""
    line = head.split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[0].isalpha():
        return None, ""
    try:
        return parts[0].decode("ascii"), parts[1].decode("ascii")
    except UnicodeDecodeError:
        return None, ""
