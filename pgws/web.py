"""Plain HTTP on the WebSocket port: /health, /ready, /metrics, /pgws-client.js, then static
files from PGWS_ROOT_PATH (or a short 200).

websockets hands us every request before the upgrade; those that are not upgrades end here.
A file's body is never held in memory: `serve_plain` answers with its headers only and
`send_file` streams it in chunks, as fast as the client reads, from websockets' process_response.
Static files are GET and HEAD only and never leave the root: the path is split into segments
before percent-decoding, and every segment that could mean something other than one file name
(`..`, an encoded `/`, a backslash, NUL, a dotfile, invalid UTF-8) is refused, then the resolved
file (symlinks followed) must still be inside the resolved root.
"""

from __future__ import annotations

import asyncio
import dataclasses
import mimetypes
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from urllib.parse import unquote

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from pgws import assets

# Tokens travel in URLs: never leak them to other sites through the Referer header.
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
# Read and written at a time; with the socket's write limit, what one download holds in memory.
_CHUNK = 64 * 1024
_ALLOWED_METHODS = ("GET", "HEAD")
# Fixed, so a file is served the same on every machine (mimetypes reads /etc/mime.types).
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".htm": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".txt": "text/plain; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".ico": "image/x-icon",
    ".wasm": "application/wasm",
    ".woff2": "font/woff2",
    ".woff": "font/woff",
}


@dataclasses.dataclass
class FileResponse(Response):
    """A 200 for a static file: the headers, and the file `send_file` streams as its body."""

    path: Path = Path()
    size: int = 0  # Content-Length: exactly this many bytes are sent, or the socket is aborted


def respond(
    status: HTTPStatus,
    body: bytes,
    content_type: str,
    *,
    head: bool = False,
    extra: dict[str, str] | None = None,
) -> Response:
    """An HTTP response with pgws's standard headers (HEAD: the headers of GET, no body)."""
    headers = _headers(content_type, len(body), extra)
    return Response(status.value, status.phrase, headers, b"" if head else body)


def _headers(content_type: str, length: int, extra: dict[str, str] | None = None) -> Headers:
    return Headers(
        {
            "Content-Type": content_type,
            "Content-Length": str(length),
            "Connection": "close",
            **SECURITY_HEADERS,
            **(extra or {}),
        }
    )


def text(status: HTTPStatus, message: str, *, head: bool = False) -> Response:
    """A short plain-text response."""
    return respond(status, message.encode(), "text/plain; charset=utf-8", head=head)


def serve_plain(root: Path | None, request: Request) -> Response:
    """Answer a request that is not a WebSocket upgrade: 200, 404 or 405, never an exception."""
    if request.method not in _ALLOWED_METHODS:
        return respond(
            HTTPStatus.METHOD_NOT_ALLOWED,
            b"method not allowed\n",
            "text/plain; charset=utf-8",
            extra={"Allow": ", ".join(_ALLOWED_METHODS)},
        )
    head = request.method == "HEAD"
    if root is None:
        return text(HTTPStatus.OK, "pgws: connect with a WebSocket client\n", head=head)
    path = resolve_static(root, request.path)
    if path is None:
        return text(HTTPStatus.NOT_FOUND, "not found\n", head=head)
    try:
        size = path.stat().st_size
    except OSError:
        return text(HTTPStatus.NOT_FOUND, "not found\n", head=head)
    headers = _headers(content_type(path.name), size)
    if head:
        return Response(HTTPStatus.OK.value, HTTPStatus.OK.phrase, headers)
    return FileResponse(HTTPStatus.OK.value, HTTPStatus.OK.phrase, headers, path=path, size=size)


class Routes:
    """Requests that are not upgrades: health, readiness, metrics, then static files."""

    def __init__(
        self,
        root: Path | None,
        *,
        ready: Callable[[], bool],
        metrics: Callable[[], tuple[bytes, str]] | None = None,
    ) -> None:
        self._root = root
        self._ready = ready
        self._metrics = metrics

    def answer(self, request: Request) -> Response:
        """The response to one plain request (never an exception)."""
        path = request.path.split("?", 1)[0]
        head = request.method == "HEAD"
        if path in ("/health", "/ready", "/metrics") and request.method not in ("GET", "HEAD"):
            return serve_plain(None, request)  # the 405 static files get
        if path == "/health":
            return text(HTTPStatus.OK, "ok\n", head=head)
        if path == "/ready":
            if self._ready():
                return text(HTTPStatus.OK, "ready\n", head=head)
            return text(HTTPStatus.SERVICE_UNAVAILABLE, "not ready\n", head=head)
        if path == "/metrics":
            if self._metrics is None:  # PGWS_METRICS=off, or served on a listener of its own
                return text(HTTPStatus.NOT_FOUND, "not found\n", head=head)
            body, media_type = self._metrics()
            return respond(HTTPStatus.OK, body, media_type, head=head)
        if path == assets.CLIENT_PATH and request.method in _ALLOWED_METHODS:
            return client_script(request)
        return serve_plain(self._root, request)


def client_script(request: Request) -> Response:
    """/pgws-client.js from the package (SPEC 10): 200, or 304 when the client's copy is current."""
    body, etag = assets.client_script()
    extra = {
        "Cache-Control": assets.CACHE_CONTROL,
        "ETag": etag,
        "Access-Control-Allow-Origin": "*",
    }
    if assets.not_modified(request.headers.get("If-None-Match"), etag):
        headers = _headers(assets.CONTENT_TYPE, 0, extra)
        del headers["Content-Length"]  # a 304 has no body: no length (RFC 9110 8.6)
        return Response(HTTPStatus.NOT_MODIFIED.value, HTTPStatus.NOT_MODIFIED.phrase, headers)
    return respond(
        HTTPStatus.OK, body, assets.CONTENT_TYPE, head=request.method == "HEAD", extra=extra
    )


async def send_file(connection: ServerConnection, response: FileResponse) -> None:
    """Write `response` to the socket ourselves, headers then the file in chunks; then close it.

    websockets only sends a body it holds in memory, so a file is written here, from
    process_response, each chunk once the socket's write buffer is back under its limit
    (PGWS_CLIENT_MAX_BUFFER): a download holds about that much memory, whatever the file's size
    and however slowly the client reads. Closed here, the connection makes websockets send nothing
    more. A client that has not taken the whole file within websockets' open timeout (10 s) is
    cut off when that timeout cancels this, as when the body was one write.
    """
    transport = connection.transport
    sent = 0
    try:
        transport.write(response.serialize())  # the headers: the body is empty
        with response.path.open("rb") as file:
            while sent < response.size and not transport.is_closing():
                # A 64 KiB read from the page cache: cheaper in the loop than in a thread.
                chunk = file.read(min(_CHUNK, response.size - sent))
                if not chunk:
                    break  # the file shrank since its stat(): abort rather than send too little
                transport.write(chunk)
                sent += len(chunk)
                await connection.drain()
    except asyncio.CancelledError:
        transport.abort()  # websockets' open timeout: a client too slow to take the file
        raise
    except (OSError, RuntimeError):  # the file went away, the client reset or half-closed
        sent = -1
    await _close(connection, complete=sent == response.size)


async def _close(connection: ServerConnection, *, complete: bool) -> None:
    """End a streamed response; return once the connection is closed (websockets checks that)."""
    transport = connection.transport
    if not complete:
        transport.abort()
    elif transport.can_write_eof():
        transport.write_eof()  # as websockets does: half-close, and let the client close
    else:
        transport.close()  # TLS: close_notify after the buffered data
    try:
        async with asyncio.timeout(connection.close_timeout):
            await asyncio.shield(connection.connection_lost_waiter)
    except TimeoutError:
        transport.abort()
        await asyncio.shield(connection.connection_lost_waiter)


def content_type(name: str) -> str:
    """The Content-Type for a file name; unknown or compressed files are opaque bytes."""
    suffix = Path(name).suffix.lower()
    if suffix in _CONTENT_TYPES:
        return _CONTENT_TYPES[suffix]
    guessed, encoding = mimetypes.guess_type(name, strict=True)
    if guessed is None or encoding is not None:
        return "application/octet-stream"
    return f"{guessed}; charset=utf-8" if guessed.startswith("text/") else guessed


def resolve_static(root: Path, raw_path: str) -> Path | None:
    """The file under `root` a URL path names (`/` is index.html), or None if it must not be served.

    Each `/`-separated segment is decoded on its own, so `%2f` cannot join two segments. A segment
    is refused when it is empty (`//etc`), `.`/`..` or any other dotfile (as the original server's
    wai-app-static does), or holds `/`, `\\` or NUL once decoded; invalid UTF-8 is refused too.
    The result, symlinks resolved, must be a regular file inside the resolved root.
    """
    path = raw_path.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith("/"):
        return None  # `*`, absolute-form `http://host/…`: not a file of ours
    segments: list[str] = []
    for raw in path[1:].split("/"):
        try:
            segment = unquote(raw, errors="strict")
        except UnicodeDecodeError:
            return None
        if segment.startswith(".") or any(char in segment for char in "/\\\x00"):
            return None
        segments.append(segment)
    if segments[-1] == "":
        segments[-1] = "index.html"  # `/` and `/dir/`
    if "" in segments:
        return None
    try:
        base = root.resolve(strict=True)
        candidate = base.joinpath(*segments).resolve(strict=True)
        inside = candidate.is_relative_to(base) and candidate.is_file()
    except (OSError, RuntimeError, ValueError):
        return None
    return candidate if inside else None
