"""What one setting is: the `Setting` descriptor and the parsers a value goes through.

A parser gets the variable's name (for its messages) and its value exactly as set; it returns
the typed value or raises `ConfigError` naming the variable, never echoing a secret. The
settings themselves are declared in `config`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Generic, TypeVar
from urllib.parse import urlsplit

from pgws.errors import ConfigError
from pgws.limits import MAX_CHANNEL_BYTES

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}

T = TypeVar("T")
# (variable name, value as set; blank only for an optional setting's default) -> typed value.
Parse = Callable[[str, str], T]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Setting(Generic[T]):
    """One environment variable: name, parser, default as written in an env file, help.

    The default goes through `parse` like any value an operator writes, so the typed default and
    the one `--help` shows are the same by construction. An empty default means unset, as
    `KEY=` does in an env file; a blank value is the same as no value.
    """

    name: str
    parse: Parse[T]
    help: str
    default: str = ""
    required: bool = False
    secret: bool = False  # shown as [redacted] (or masked) in the `settings` line

    def __post_init__(self) -> None:
        if self.required and self.default:
            raise ValueError(f"{self.name}: a required setting has no default")

    @property
    def field(self) -> str:
        """The Config field it fills (STYLE: PGWS_X is Config.x)."""
        return self.name.removeprefix("PGWS_").lower()

    @property
    def default_value(self) -> T:
        """What the variable gives when it is not set."""
        return self.read({})

    def read(self, env: Mapping[str, str]) -> T:
        """The typed value from `env`; raise ConfigError naming the variable."""
        value = env.get(self.name, "")
        if not value.strip():
            if self.required:
                raise ConfigError(self.name, "must be set")
            value = self.default
        return self.parse(self.name, value)


def optional(parse: Parse[T]) -> Parse[T | None]:
    """`parse`, with blank (the default of an unset setting) meaning None."""

    def parse_optional(name: str, value: str) -> T | None:
        return parse(name, value) if value.strip() else None

    return parse_optional


def text(name: str, value: str) -> str:
    """Any text, surrounding whitespace dropped."""
    return value.strip()


def boolean(name: str, value: str) -> bool:
    """true/false, 1/0, yes/no, on/off in any case."""
    folded = value.strip().lower()
    if folded in _TRUE:
        return True
    if folded in _FALSE:
        return False
    raise ConfigError(name, f"expected true or false, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Integer:
    """A whole number from `minimum` to `maximum`."""

    minimum: int
    maximum: int

    def __call__(self, name: str, value: str) -> int:
        value = value.strip()
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(name, f"expected an integer, got {value!r}") from None
        if not self.minimum <= number <= self.maximum:
            raise ConfigError(
                name, f"must be between {self.minimum} and {self.maximum}, got {number}"
            )
        return number


@dataclasses.dataclass(frozen=True)
class ByteBound:
    """A size in bytes from `minimum` to `maximum`, where 0 means no bound (None)."""

    minimum: int
    maximum: int = 2**40

    def __call__(self, name: str, value: str) -> int | None:
        value = value.strip()
        if value.isdecimal() and int(value) == 0:
            return None
        try:
            return Integer(self.minimum, self.maximum)(name, value)
        except ConfigError:
            raise ConfigError(
                name,
                f"expected 0 (no bound) or bytes from {self.minimum} to {self.maximum},"
                f" got {value!r}",
            ) from None


@dataclasses.dataclass(frozen=True)
class Choice:
    """One of a few words, in any case."""

    choices: Sequence[str]

    def __call__(self, name: str, value: str) -> str:
        folded = value.strip().lower()
        if folded not in self.choices:
            raise ConfigError(name, f"expected one of {', '.join(self.choices)}, got {folded!r}")
        return folded


def _number_of_seconds(name: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ConfigError(name, f"expected a number of seconds, got {value!r}") from None


def seconds(name: str, value: str) -> float:
    """A duration in seconds, more than 0 and at most an hour."""
    value = value.strip()
    number = _number_of_seconds(name, value)
    if not 0 < number <= 3600:
        raise ConfigError(name, f"must be more than 0 and at most 3600 seconds, got {value!r}")
    return number


def skew_seconds(name: str, value: str) -> float:
    """Seconds of clock skew: 0 (none, the default) to 300."""
    value = value.strip()
    number = _number_of_seconds(name, value)
    if not 0 <= number <= 300:
        raise ConfigError(name, f"must be between 0 and 300 seconds, got {value!r}")
    return number


def interval_ms(name: str, value: str) -> float | None:
    """Milliseconds in the env, float seconds in Config; 0 means off (None)."""
    value = value.strip()
    try:
        milliseconds = int(value)
    except ValueError:
        raise ConfigError(name, f"expected milliseconds (an integer), got {value!r}") from None
    if milliseconds < 0 or milliseconds > 86_400_000:
        raise ConfigError(name, f"must be between 0 and 86400000 ms, got {milliseconds}")
    return milliseconds / 1000 if milliseconds else None


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


@dataclasses.dataclass(frozen=True)
class Channel:
    """A PostgreSQL channel name that LISTEN and pg_notify() both keep whole."""

    max_bytes: int

    def __call__(self, name: str, value: str) -> str:
        value = value.strip()
        if len(value.encode()) > self.max_bytes:
            raise ConfigError(name, f"must be at most {self.max_bytes} bytes (a PostgreSQL name)")
        if any(ord(char) < 32 for char in value):
            raise ConfigError(name, "must not contain control characters")
        return value


class ChannelSet:
    """Which channels are durable (PGWS_DURABLE): none, every one, or names and `prefix*` families.

    Falsy when it selects no channel, so `if config.durable:` reads as "durable mode is on".
    Its str() is the setting's value in canonical form (the `settings` log line shows that).
    """

    __slots__ = ("every", "names", "prefixes")

    def __init__(
        self, *, every: bool = False, names: Iterable[str] = (), prefixes: Iterable[str] = ()
    ) -> None:
        self.every = every
        self.names = frozenset(names)
        self.prefixes = tuple(sorted(set(prefixes)))

    def __contains__(self, channel: object) -> bool:
        if not isinstance(channel, str):
            return False
        return (
            self.every
            or channel in self.names
            or any(channel.startswith(prefix) for prefix in self.prefixes)
        )

    def __bool__(self) -> bool:
        return self.every or bool(self.names) or bool(self.prefixes)

    def _key(self) -> tuple[bool, frozenset[str], tuple[str, ...]]:
        return self.every, self.names, self.prefixes

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ChannelSet) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        if self.every:
            return "true"
        if not self:
            return "false"
        return ",".join([*sorted(self.names), *(f"{prefix}*" for prefix in self.prefixes)])

    def __repr__(self) -> str:
        return f"ChannelSet({str(self)!r})"


def channel_set(name: str, value: str) -> ChannelSet:
    """true (every channel), false (none), or comma-separated channels, `prefix*` for a family.

    The booleans win: a channel literally named `true` cannot be listed (name it with `true*`).
    """
    folded = value.strip().lower()
    if folded in _TRUE:
        return ChannelSet(every=True)
    if folded in _FALSE:
        return ChannelSet()
    names: set[str] = set()
    prefixes: list[str] = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        if any(ord(char) < 32 or ord(char) == 127 for char in item):
            raise ConfigError(name, "must not contain control characters")
        if item.endswith("*"):
            prefix = item[:-1]
            if "*" in prefix:
                raise ConfigError(name, f"'*' may only end a channel family, got {item!r}")
            if not prefix:
                return ChannelSet(every=True)  # `*`: every channel, as `true`
            if len(prefix.encode()) >= MAX_CHANNEL_BYTES:
                raise ConfigError(name, f"{item!r}: channel names are at most 63 bytes")
            prefixes.append(prefix)
            continue
        if "*" in item:
            raise ConfigError(name, f"'*' may only end a channel family, got {item!r}")
        if len(item.encode()) > MAX_CHANNEL_BYTES:
            raise ConfigError(name, f"{item!r}: channel names are at most 63 bytes")
        names.add(item)
    if not names and not prefixes:
        raise ConfigError(name, f"expected true, false or a list of channels, got {value!r}")
    return ChannelSet(names=names, prefixes=prefixes)


@dataclasses.dataclass(frozen=True)
class Seconds:
    """A duration in seconds from `minimum` (exclusive) to `maximum`."""

    minimum: float
    maximum: float

    def __call__(self, name: str, value: str) -> float:
        value = value.strip()
        number = _number_of_seconds(name, value)
        if not self.minimum < number <= self.maximum:
            raise ConfigError(
                name,
                f"must be more than {self.minimum:g} and at most {self.maximum:g} seconds,"
                f" got {value!r}",
            )
        return number


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
