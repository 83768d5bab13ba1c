"""What one setting is: the `Setting` descriptor, which reads one variable through its parser.

A parser gets the variable's name (for its messages) and its value exactly as set; it returns
the typed value or raises `ConfigError` naming the variable, never echoing a secret. The
parsers are in `parsers` (numbers, words, channels) and `places` (hosts, URLs, files); the
settings themselves are declared in `config`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Generic, TypeVar

from pgws.errors import ConfigError

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
