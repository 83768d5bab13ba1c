"""Small pieces shared by the load generator, the raw gateway and the runner.

HS256 tokens made by hand (the load generator must not depend on a JWT library), the bits of the
WebSocket opening handshake a client needs, masked client frames, and the file-descriptor limit.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import resource
from collections.abc import Mapping

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# Client frames must be masked; any 4-byte key is valid and a zero key makes masking free, so the
# load generator spends nothing on it. Servers cannot tell and must not care.
ZERO_MASK = b"\x00\x00\x00\x00"


def _b64url(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def make_token(secret: str, claims: Mapping[str, object]) -> str:
    """Return an HS256 JWT for `claims`, signed with the plain-string `secret`."""
    header = _b64url(b'{"alg":"HS256","typ":"JWT"}')
    body = _b64url(json.dumps(dict(claims), separators=(",", ":")).encode())
    signing_input = header + b"." + body
    signature = hmac.new(secret.encode(), signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + _b64url(signature)).decode()


def handshake_request(
    host: str, port: int, path: str, subprotocol: str | None = None
) -> tuple[bytes, bytes]:
    """Return (request bytes, expected Sec-WebSocket-Accept) for one opening handshake, offering
    `subprotocol` (e.g. pgws.v2) when given.

    No extension is offered, so the connection is never compressed whatever the server prefers.
    """
    key = base64.b64encode(os.urandom(16))
    accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())  # noqa: S324  # RFC 6455 says SHA-1
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        + ("" if subprotocol is None else f"Sec-WebSocket-Protocol: {subprotocol}\r\n")
        + "\r\n"
    ).encode()
    return request, accept


def handshake_status(head: bytes, accept: bytes) -> int:
    """Return the HTTP status of a handshake response head; 101 only if the accept key matches."""
    status_line, _, headers = head.partition(b"\r\n")
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return 0
    status = int(parts[1])
    if status == 101 and b"sec-websocket-accept: " + accept.lower() not in headers.lower():
        return 0
    return status


def client_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """Encode one final, masked client frame (text by default)."""
    length = len(payload)
    if length < 126:
        head = bytes((0x80 | opcode, 0x80 | length))
    elif length < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + length.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + length.to_bytes(8, "big")
    return head + ZERO_MASK + payload


async def probe(host: str, port: int, path: str, within: float) -> int:
    """Open one WebSocket and return the handshake status (0 when nothing usable came back)."""
    request, accept = handshake_request(host, port, path)
    async with asyncio.timeout(within):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            return handshake_status(head, accept)
        finally:
            writer.close()


def raise_nofile_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE to at least `wanted` if allowed (root may raise the hard limit too).

    Returns the soft limit now in force; children inherit it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    if hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    else:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
