"""Value parsers for settings that name a place: hosts, `host:port`, origins, URLs and files.

Each takes the variable's name (for its messages) and its value exactly as set, and returns the
typed value or raises `ConfigError` naming the variable (see `setting.Setting`). URLs are shown
in messages only through `url_shown`, which drops credentials, query and fragment.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from urllib.parse import urlsplit

from pgws.errors import ConfigError


def host(name: str, value: str) -> str:
    """*4, *6, * or a host name or address, checked as getaddrinfo() would first."""
    value = value.strip()
    if any(char.isspace() for char in value) or "/" in value:
        raise ConfigError(name, f"expected *4, *6, * or a host or address, got {value!r}")
    try:
        value.encode("idna")  # what getaddrinfo() does first: empty or over-long labels fail
    except UnicodeError:
        raise ConfigError(name, f"{value!r} is not a valid host name") from None
    return value


def metrics_place(name: str, value: str) -> str:
    """`on`, `off`, or `host:port` (host as PGWS_HOST takes it, an IPv6 address in brackets)."""
    value = value.strip()
    if value.lower() in ("on", "off"):
        return value.lower()
    expected = f"expected on, off or host:port such as 127.0.0.1:9187, got {value!r}"
    address, colon, port = value.rpartition(":")
    if not colon or not address or not port.isascii() or not port.isdigit():
        raise ConfigError(name, expected)
    if address.startswith("[") != address.endswith("]"):
        raise ConfigError(name, expected)
    if int(port) > 65535:
        raise ConfigError(name, f"port must be at most 65535, got {value!r}")
    bare = address[1:-1] if address.startswith("[") else address
    if not bare or (":" in bare and not address.startswith("[")):
        raise ConfigError(name, f"{expected} (an IPv6 address goes in brackets: [::1]:9187)")
    host(name, bare)
    return f"{address}:{int(port)}"


def metrics_address(place: str) -> tuple[str, int] | None:
    """The (host, port) of a `host:port` PGWS_METRICS value; None for `on` and `off`."""
    if place in ("on", "off"):
        return None
    address, _, port = place.rpartition(":")
    return address.removeprefix("[").removesuffix("]"), int(port)


def origins(name: str, value: str) -> frozenset[str]:
    """Origins as browsers send them: scheme://host[:port], compared case-insensitively."""
    found = set()
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        parsed = urlsplit(item)
        if parsed.scheme not in ("http", "https") or not parsed.netloc or parsed.path.strip("/"):
            raise ConfigError(name, f"expected origins like https://app.example.com, got {item!r}")
        found.add(f"{parsed.scheme}://{parsed.netloc}".lower())
    if not found:
        raise ConfigError(name, "lists no origin")
    return frozenset(found)


def existing_file(name: str, value: str) -> Path:
    """A readable file."""
    value = value.strip()
    path = Path(value)
    if not path.is_file():
        raise ConfigError(name, f"no such file: {value!r}")
    if not os.access(path, os.R_OK):
        raise ConfigError(name, f"cannot read {value!r}: permission denied")
    return path


def existing_dir(name: str, value: str) -> Path:
    """A folder, as an absolute path."""
    value = value.strip()
    path = Path(value)
    if not path.is_dir():
        raise ConfigError(name, f"no such folder: {value!r}")
    return path.resolve()


def at_file(name: str, value: str) -> str:
    """The value, or with `@path` the file's contents, trailing newline stripped."""
    value = value.strip()
    if not value.startswith("@"):
        return value
    path = Path(value[1:])
    try:
        contents = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise ConfigError(name, f"cannot read {str(path)!r}: {reason}") from None
    contents = contents.rstrip("\r\n")
    if not contents.strip():
        raise ConfigError(name, f"file {str(path)!r} is empty")
    return contents


_LOOPBACK_NAMES = frozenset({"localhost", "localhost."})  # RFC 6761: always this machine


def url_shown(url: str) -> str:
    """A URL as logs and errors may show it: scheme, host, port and path, without the user
    name, password, query or fragment (where API keys hide)."""
    try:
        parts = urlsplit(url.strip())
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return "(an unparsable URL)"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}{parts.path}"


def is_loopback_host(hostname: str) -> bool:
    """Whether a URL's host is this machine: `localhost`, 127.0.0.0/8 or ::1."""
    if hostname.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def https_url(name: str, value: str) -> str:
    """An https:// URL (http:// only when its host is loopback), as fetched."""
    value = value.strip()
    shown = url_shown(value)
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  # raises ValueError on a port that is no number or out of range
    except ValueError:
        raise ConfigError(name, f"is not a valid URL: {shown}") from None
    if any(char.isspace() or ord(char) < 32 for char in value):
        raise ConfigError(name, f"is not a valid URL (whitespace or control characters): {shown}")
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(name, f"expected an https:// URL, got {shown}")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ConfigError(name, f"must be https:// (http:// only for a loopback host), got {shown}")
    return value


def writable_file(name: str, value: str) -> Path:
    """A file pgws may create or replace: its folder exists (the file need not)."""
    value = value.strip()
    path = Path(value)
    if path.is_dir():
        raise ConfigError(name, f"{value!r} is a folder, not a file")
    if not path.parent.is_dir():
        raise ConfigError(name, f"no such folder: {str(path.parent)!r}")
    return path
