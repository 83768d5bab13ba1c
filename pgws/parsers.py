"""Value parsers for settings: numbers, durations, words, channel names and channel sets.

Each takes the variable's name (for its messages) and its value exactly as set, and returns the
typed value or raises `ConfigError` naming the variable (see `setting.Setting`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from pgws.errors import ConfigError
from pgws.limits import MAX_CHANNEL_BYTES

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


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
