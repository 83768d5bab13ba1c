"""Fetching a JWKS over HTTPS: one blocking GET with bounded time and size, checked redirects.

The fetch is urllib's (call it in a thread once serving): no HTTP client library needed. Every
failure is a ConfigError naming PGWS_JWT_JWKS_URL whose message shows the URL only through
`url_shown` (no credentials, query or fragment). What to do with the keys is `jwks`'s job.
"""

from __future__ import annotations

import base64
import dataclasses
import ssl
import time
import urllib.error
import urllib.request
from http.client import HTTPException
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from pgws import __version__
from pgws.errors import ConfigError
from pgws.keys import RemoteKeys, load_remote_jwks
from pgws.places import https_url, url_shown
from pgws.settings_auth import JWT_JWKS_URL

FETCH_TIMEOUT = 10.0  # seconds for one fetch, connection to last byte
MAX_DOCUMENT = 1024 * 1024  # bytes; real JWKS documents are a few KiB


@dataclasses.dataclass(frozen=True)
class Fetched:
    """One good fetch: its keys, the raw document (for the cache) and what it said about caching."""

    keys: RemoteKeys
    document: bytes
    cache_control: str | None


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects are followed only to URLs the setting itself would take (no https → http)."""

    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        try:
            https_url(JWT_JWKS_URL.name, newurl)
        except ConfigError:
            fp.close()
            raise  # ends the fetch
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _request(url: str) -> urllib.request.Request:
    """The GET for `url`; a user and password in it become Basic authentication."""
    parts = urlsplit(url)
    headers = {"Accept": "application/json", "User-Agent": f"pgws/{__version__}"}
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        netloc = parts.netloc.rpartition("@")[2]
        url = urlunsplit(parts._replace(netloc=netloc))
    return urllib.request.Request(url, headers=headers)  # noqa: S310  # https_url checked it


def fetch_jwks(url: str, ca_file: Path | None = None, *, timeout: float = FETCH_TIMEOUT) -> Fetched:
    """GET the JWKS and load its keys (blocking: call it in a thread once serving).

    `timeout` bounds each network wait and the whole body too, so a provider trickling bytes
    cannot hold a fetch for long. Raises ConfigError naming PGWS_JWT_JWKS_URL, its message
    showing the URL without credentials or query: unreachable, not HTTP 200, too slow, too
    large, or no usable key.
    """
    name, shown = JWT_JWKS_URL.name, url_shown(url)
    try:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("PGWS_JWT_JWKS_CA_FILE", f"cannot load its certificates: {exc}") from None
    opener = urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=context), _CheckedRedirects()
    )
    try:
        with opener.open(_request(url), timeout=timeout) as response:
            cache_control = response.headers.get("Cache-Control")
            document = _read_body(response, time.monotonic() + timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise ConfigError(name, f"{shown} answered HTTP {exc.code}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason if isinstance(exc.reason, str) else _os_reason(exc.reason)
        raise ConfigError(name, f"cannot fetch {shown}: {reason}") from None
    except (OSError, HTTPException, ValueError) as exc:  # TimeoutError, a reset, a bad status line
        raise ConfigError(name, f"cannot fetch {shown}: {_os_reason(exc)}") from None
    if len(document) > MAX_DOCUMENT:
        raise ConfigError(name, f"{shown} sent more than {MAX_DOCUMENT} bytes")
    try:
        keys = load_remote_jwks(document, name)
    except ConfigError as exc:
        raise ConfigError(name, f"{shown}: {exc.problem}") from None
    return Fetched(keys, document, cache_control)


def _read_body(response: Any, deadline: float) -> bytes:
    """At most MAX_DOCUMENT + 1 bytes, one socket read at a time, until EOF or `deadline`."""
    chunks: list[bytes] = []
    size = 0
    while size <= MAX_DOCUMENT and (chunk := response.read1(65536)):
        chunks.append(chunk)
        size += len(chunk)
        if time.monotonic() > deadline:
            raise TimeoutError
    return b"".join(chunks)


def _os_reason(exc: BaseException) -> str:
    """One line about a network failure, without the URL (which urllib does not put in)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted ({exc.verify_message})"
    if isinstance(exc, TimeoutError):
        return "too slow (timed out)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__
