"""Plain HTTP on the WebSocket port: static files from PGWS_ROOT_PATH, or a short 200.

websockets hands us every request before the upgrade; those that are not upgrades end here.
"""

from __future__ import annotations

import mimetypes
from http import HTTPStatus
from pathlib import Path
from urllib.parse import unquote

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

# Tokens travel in URLs: never leak them to other sites through the Referer header.
_SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
_MAX_FILE = 16 * 1024 * 1024


def respond(status: HTTPStatus, body: bytes, content_type: str, *, head: bool = False) -> Response:
    """An HTTP response with pgws's standard headers (HEAD: the headers of GET, no body)."""
    headers = Headers(
        {
            "Content-Type": content_type,
            "Content-Length": str(len(body)),
            "Connection": "close",
            **_SECURITY_HEADERS,
        }
    )
    return Response(status.value, status.phrase, headers, b"" if head else body)


def text(status: HTTPStatus, message: str, *, head: bool = False) -> Response:
    """A short plain-text response."""
    return respond(status, message.encode(), "text/plain; charset=utf-8", head=head)


def serve_plain(root: Path | None, request: Request) -> Response:
    """Answer a request that is not a WebSocket upgrade."""
    head = request.method == "HEAD"
    if request.method not in ("GET", "HEAD"):
        return text(HTTPStatus.METHOD_NOT_ALLOWED, "method not allowed\n")
    if root is None:
        return text(HTTPStatus.OK, "pgws: connect with a WebSocket client\n", head=head)
    path = resolve_static(root, request.path)
    if path is None:
        return text(HTTPStatus.NOT_FOUND, "not found\n", head=head)
    try:
        if path.stat().st_size > _MAX_FILE:
            return text(HTTPStatus.NOT_FOUND, "not found\n", head=head)
        body = path.read_bytes()
    except OSError:
        return text(HTTPStatus.NOT_FOUND, "not found\n", head=head)
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if content_type.startswith("text/") or content_type in ("application/javascript",):
        content_type += "; charset=utf-8"
    return respond(HTTPStatus.OK, body, content_type, head=head)


def resolve_static(root: Path, raw_path: str) -> Path | None:
    """The file under `root` a URL path names (`/` is index.html), or None if it must not be served.

    `root` is already resolved. The decoded path must stay inside it after resolving symlinks;
    NUL bytes, backslashes and invalid encodings are refused outright.
    """
    path = raw_path.split("?", 1)[0].split("#", 1)[0]
    try:
        decoded = unquote(path, errors="strict")
    except UnicodeDecodeError:
        return None
    if "\x00" in decoded or "\\" in decoded or not decoded.startswith("/"):
        return None
    relative = decoded.lstrip("/")
    if relative == "" or relative.endswith("/"):
        relative += "index.html"
    if any(part in ("..", ".") for part in relative.split("/")):
        return None
    try:
        candidate = (root / relative).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not candidate.is_relative_to(root) or not candidate.is_file():
        return None
    return candidate
