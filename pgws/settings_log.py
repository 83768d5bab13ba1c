"""What start-up says about settings: PGWS_* names that are no setting (with the closest one), and
every setting as pgws runs with it, secrets redacted, for the `settings` log line."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pgws.config import DB_URI, SETTINGS, Config
from pgws.logs import REDACTED
from pgws.parsers import ChannelSet

# PGWS_* names that are not settings: the --workers supervisor gives each worker its number, and
# the test suite reads PGWS_TEST_*.
_NOT_SETTINGS = frozenset(
    {"PGWS_WORKER_ID", "PGWS_SUPERVISOR_PID", "PGWS_PARENT_PIPE", "PGWS_SHARED_LISTENER_NAME"}
)
_NOT_SETTINGS_PREFIX = "PGWS_TEST_"


def unknown_settings(names: Iterable[str]) -> list[tuple[str, str | None]]:
    """PGWS_* names (in any case) that are no setting, each with the closest setting, if any.

    The original server ignores unknown names, so these are warnings, not errors: a typo such as
    PGWS_MAX_CONECTIONS would otherwise run with the default without a word.
    """
    known = [setting.name for setting in SETTINGS]
    found = []
    for name in sorted(set(names)):
        upper = name.upper()
        if not upper.startswith("PGWS_") or name in known or name in _NOT_SETTINGS:
            continue
        if upper.startswith(_NOT_SETTINGS_PREFIX):
            continue
        guesses = difflib.get_close_matches(upper, known, n=1, cutoff=0.8)
        found.append((name, guesses[0] if guesses else None))
    return found


def effective_settings(config: Config, *, mask_db_uri: Callable[[str], str]) -> dict[str, Any]:
    """Every setting as pgws runs with it, for the `settings` log line at start.

    Secret settings are never shown, except the database URI through `mask_db_uri`
    (pgws.db.connect.masked_db_uri: passwords masked, host and database kept); durations are
    seconds, as in Config.
    """
    secret = {setting.field for setting in SETTINGS if setting.secret}
    shown: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name in secret:
            value = REDACTED
        elif isinstance(value, Path | ChannelSet):
            value = str(value)
        elif isinstance(value, frozenset):
            value = sorted(value)
        shown[field.name] = value
    shown[DB_URI.field] = mask_db_uri(config.db_uri)
    return shown
