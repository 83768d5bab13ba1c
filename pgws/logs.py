"""structlog set-up: one event per line, JSON when stderr is not a terminal, secrets redacted.

The library loggers (websockets, psycopg, asyncio) go through the same processors, so every line
has one shape. Not logging secrets is the plan; `redact` is the seatbelt.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import orjson
import structlog

# What stands in for a secret wherever one would have been shown.
REDACTED = "[redacted]"

# Field names whose values are never printed, whatever they hold.
SECRET_FIELDS = frozenset(
    {"token", "jwt", "jwt_secret", "secret", "db_uri", "password", "authorization"}
)
# Anything shaped like a JWT (base64url JSON header "eyJ…" and two more segments).
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# Passwords inside connection URIs and conninfo strings.
_URI_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")
_CONNINFO_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def scrub(text: str) -> str:
    """Replace tokens and passwords found in free text."""
    # Cheap substring tests first: this runs on every string of every log line.
    if "eyJ" in text:
        text = _JWT.sub("[token]", text)
    if "@" in text:
        text = _URI_PASSWORD.sub(r"\1[password]@", text)
    if "assword" in text or "ASSWORD" in text:
        text = _CONNINFO_PASSWORD.sub(r"\1[password]", text)
    return text


def redact(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: drop secret fields and scrub token-shaped text from every value."""
    for key, value in event.items():
        if key.lower() in SECRET_FIELDS:
            event[key] = REDACTED
        elif isinstance(value, str):
            event[key] = scrub(value)
    return event


class _NamedWriteLogger(structlog.WriteLogger):
    """structlog's plain writer, with the name `get_logger(name)` gave it (for `logger`)."""

    def __init__(self, file: TextIO, name: str) -> None:
        super().__init__(file)
        self.name = name


def _dumps(value: Any, **_: Any) -> str:
    return orjson.dumps(value, default=str).decode()


def configure(
    *,
    json: bool | None = None,
    level: int = logging.INFO,
    stream: TextIO | None = None,
    cache_loggers: bool = True,
) -> None:
    """Route structlog and stdlib logging to `stream` (stderr); call once, from the CLI.

    Tests pass `cache_loggers=False` so that reconfiguring and `capture_logs()` reach loggers
    that were already used.
    """
    stream = stream or sys.stderr
    if json is None:
        json = not stream.isatty()
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.ExtraAdder(),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_dumps)
        if json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # At DEBUG websockets logs request paths, and paths hold tokens.
    logging.getLogger("websockets").setLevel(max(level, logging.INFO))
    # websockets logs every open/close at INFO; pgws logs its own, richer lines for those.
    logging.getLogger("websockets.server").setLevel(logging.WARNING)
    # pgws's own events skip the stdlib logging machinery (LogRecord, caller lookup, handler
    # locks): a quarter of a handshake's CPU went there. Library loggers still use it.
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
        logger_factory=lambda *args: _NamedWriteLogger(stream, str(args[0]) if args else "pgws"),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=cache_loggers,
    )
