"""Env files: `--env-file` (sample-env's format) and the one systemd passes as a credential.

Parsed with python-dotenv's public `dotenv_values`. It skips a line it cannot parse with a
logged warning instead of an error, so that warning is caught here and turned into a
`ConfigError`: a typo in an env file must stop start-up, not drop a setting without a word.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

from dotenv import dotenv_values

from pgws.errors import ConfigError

# The credential name the systemd unit passes the env file under (LoadCredential=env:...).
CREDENTIAL_ENV_FILE = "env"
# python-dotenv's line breaks (str.splitlines() would also split on \v, \f and others).
_LINE_BREAK = re.compile(r"\r\n|\n|\r")
_LINE_NUMBER = re.compile(r"line (\d+)")
_UNQUOTED_KEY = re.compile(r"[^=#\s]+")


def credentials_env_file(environ: Mapping[str, str]) -> Path | None:
    """`$CREDENTIALS_DIRECTORY/env` when systemd passed that credential, else None.

    With DynamicUser=yes the service cannot read /etc/pgws; systemd copies the file into a
    directory only the service's user can read and names it in CREDENTIALS_DIRECTORY.
    """
    directory = environ.get("CREDENTIALS_DIRECTORY", "").strip()
    if not directory:
        return None
    path = Path(directory) / CREDENTIAL_ENV_FILE
    # os.path.exists: an unreadable directory is "no env credential", not a traceback.
    return path if os.path.exists(path) else None


def parse_env_file(path: Path) -> dict[str, str]:
    """Read `KEY=value` lines (optional `export `, quotes, `#` comments), as in sample-env."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise ConfigError("--env-file", f"cannot read {str(path)!r}: {reason}") from None
    values, bad = _parse(text)
    # A bare `KEY` (no `=`) is a typo, not a setting to drop silently, even if a later line
    # sets KEY: python-dotenv gives None only when the last one is bare, so look for each.
    for key, value in values.items():
        line = _bare_key_line(text, key)
        if line is not None or value is None:
            bad.append(line)
    if bad:
        numbers = [number for number in bad if number is not None]
        line_text = str(min(numbers)) if numbers else "?"
        raise ConfigError("--env-file", f"{str(path)!r} line {line_text}: expected KEY=value")
    return {key: value for key, value in values.items() if value is not None}


def _parse(text: str) -> tuple[dict[str, str | None], list[int | None]]:
    """python-dotenv's values, and the line of each statement it could not parse."""
    with _dotenv_warnings() as warnings:
        # interpolate=False: a `$` in a secret or a password is taken as written.
        values = dotenv_values(stream=io.StringIO(text), interpolate=False)
    return dict(values), [_warned_line(record) for record in warnings]


@contextlib.contextmanager
def _dotenv_warnings() -> Iterator[list[logging.LogRecord]]:
    """Collect what python-dotenv logs meanwhile, instead of letting it reach stderr.

    Its level is raised to WARNING for the while, since `PGWS_LOG_LEVEL=error` (a reload)
    would otherwise hide the very warning that reports a bad line.
    """
    logger = logging.getLogger("dotenv")
    records: list[logging.LogRecord] = []
    handler = _Collect(records)
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


class _Collect(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.WARNING)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _warned_line(record: logging.LogRecord) -> int | None:
    """The line in python-dotenv's "could not parse statement starting at line N"."""
    match = _LINE_NUMBER.search(record.getMessage())
    return int(match.group(1)) if match else None


def _bare_key_line(text: str, key: str) -> int | None:
    """The first line where `key` stands alone, numbered as python-dotenv numbers statements.

    A statement starts where the one before ended, so blank lines before it count in. A line
    that only looks like one (inside a quoted value that spans lines) is told apart by parsing
    the text up to it: cut there, that value is left open, which python-dotenv reports.
    """
    forms = []
    if _UNQUOTED_KEY.fullmatch(key):
        forms.append(re.escape(key))
    if "'" not in key:
        forms.append(f"'{re.escape(key)}'")
    # Atomic groups: python-dotenv reads whitespace and `export ` greedily, never giving back.
    # A byte order mark may open the file (recent python-dotenv drops it, older ones keep it).
    statement = re.compile(
        rf"(?:^\ufeff?|(?<=[\r\n]))(?>\s*)(?>(?:export[^\S\r\n]+)?)(?:{'|'.join(forms)})"
        rf"[^\S\r\n]*(?:#[^\r\n]*)?(?=[\r\n]|\Z)"
    )
    for match in statement.finditer(text):
        values, bad = _parse(text[: match.end()])
        if not bad and key in values and values[key] is None:
            return len(_LINE_BREAK.findall(text, 0, match.start())) + 1
    return None
