"""Log redaction: secret fields, token- and password-shaped text, and the configured output."""

from __future__ import annotations

import io
import json
import logging
from typing import Any, TextIO, cast

import pytest
import structlog

from pgws import logs
from tests import conftest
from tests.conftest import SECRET, make_token

pytestmark = pytest.mark.nodb

TOKEN = make_token({"mode": "rw", "channels": ["chat"]})


@pytest.mark.parametrize(
    "field", ["token", "jwt", "jwt_secret", "secret", "db_uri", "password", "authorization"]
)
def test_redact_replaces_secret_fields(field: str) -> None:
    """Values of secret fields are replaced whatever they hold, even non-strings."""
    for value in ("anything", 12345, {"nested": "x"}, None):
        event: dict[str, Any] = {"event": "client_connected", field: value}
        assert logs.redact(None, "info", event) == {
            "event": "client_connected",
            field: "[redacted]",
        }


def test_redact_matches_field_names_in_any_case() -> None:
    """`Authorization`, `Token` and `DB_URI` are secret fields too."""
    event: dict[str, Any] = {"Authorization": "Bearer x", "Token": "t", "DB_URI": "u"}
    assert logs.redact(None, "info", event) == dict.fromkeys(event, "[redacted]")


def test_redact_keeps_harmless_fields() -> None:
    """Ordinary fields (event, channel, size, db_host) pass through unchanged."""
    event: dict[str, Any] = {"event": "x", "channel": "chat", "size": 12, "db_host": "db1"}
    assert logs.redact(None, "info", dict(event)) == event


def test_redact_scrubs_other_string_fields() -> None:
    """Tokens and passwords inside any other string field are scrubbed."""
    event: dict[str, Any] = {
        "event": f"rejected /chat/{TOKEN}",
        "path": f"/{TOKEN}?x=1",
        "error": "connection to postgresql://app:hunter2@db/app failed",
    }
    redacted = logs.redact(None, "warning", event)
    text = json.dumps(redacted)
    assert TOKEN not in text
    assert "hunter2" not in text
    assert redacted["path"] == "/[token]?x=1"
    assert redacted["error"] == "connection to postgresql://app:[password]@db/app failed"


def test_scrub_removes_jwts() -> None:
    """Anything shaped like a JWT becomes `[token]`, wherever it sits in the text."""
    assert logs.scrub(f"GET /chat/{TOKEN} HTTP/1.1") == "GET /chat/[token] HTTP/1.1"
    assert logs.scrub(f"{TOKEN},{TOKEN}") == "[token],[token]"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://u:pw@h/db", "postgresql://u:[password]@h/db"),
        (
            "postgres://u:p%40ss@h:5432/db?sslmode=require",
            "postgres://u:[password]@h:5432/db?sslmode=require",
        ),
        ("uri=postgresql://:pw@h/db end", "uri=postgresql://:[password]@h/db end"),
        ("host=h password=pw user=u", "host=h password=[password] user=u"),
        ("host=h password='p w' user=u", "host=h password=[password] user=u"),
        (r"password='it\'s secret' dbname=x", "password=[password] dbname=x"),
        ("PASSWORD = pw", "PASSWORD = [password]"),
    ],
)
def test_scrub_removes_passwords(text: str, expected: str) -> None:
    """Passwords in connection URIs and conninfo strings are replaced."""
    assert logs.scrub(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "postgresql://u@h/db",
        "postgresql://h:5432/db",
        "host=h user=u dbname=db",
        "client_connected channel=chat size=12",
        "",
    ],
)
def test_scrub_leaves_harmless_text_alone(text: str) -> None:
    """Text with no token or password comes back unchanged."""
    assert logs.scrub(text) == text


def test_configured_json_output_has_one_shape_and_no_secrets() -> None:
    """structlog and stdlib lines both come out as one JSON object per line, with no token."""
    stream = io.StringIO()
    try:
        logs.configure(json=True, stream=stream, cache_loggers=False)
        log = structlog.get_logger("pgws.test_logs")
        log.warning(
            "client_rejected",
            token=TOKEN,
            path=f"/chat/{TOKEN}",
            db="postgresql://app:hunter2@db/app",
            channel="chat",
        )
        logging.getLogger("websockets.client").warning("x %s", TOKEN)
        logging.getLogger("psycopg").error("connect failed: password=hunter2 host=db")
        logging.getLogger("websockets").debug("path %s", TOKEN)  # below INFO: dropped
    finally:
        logs.configure(
            json=True,
            level=logging.DEBUG,
            stream=cast(TextIO, conftest._Tee(conftest.LOG_LINES)),
            cache_loggers=False,
        )
    output = stream.getvalue()
    lines = output.splitlines()
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]
    for record in records:
        assert isinstance(record, dict)
        assert {"event", "level", "timestamp"} <= record.keys()
    assert records[0]["event"] == "client_rejected"
    assert records[0]["level"] == "warning"
    assert records[0]["channel"] == "chat"
    assert records[0]["token"] == "[redacted]"
    assert records[1]["event"] == "x [token]"
    assert records[1]["logger"] == "websockets.client"
    assert records[2]["level"] == "error"
    assert TOKEN not in output
    assert TOKEN.split(".")[2] not in output  # not even the signature
    assert "hunter2" not in output
    assert SECRET not in output
