"""The durable settings (SPEC 7): PGWS_DURABLE's channel selection and its three companions."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgws.config import Config
from pgws.errors import ConfigError
from pgws.parsers import ChannelSet, channel_set
from tests.conftest import run_pgws

pytestmark = pytest.mark.nodb

REQUIRED = {"PGWS_DB_URI": "postgresql://db.example/app", "PGWS_JWT_SECRET": "s" * 32}


def from_env(**settings: str) -> Config:
    return Config.from_env({**REQUIRED, **settings})


def test_durable_mode_is_off_by_default() -> None:
    """Without the settings: no durable channel, migrate at start, a day, 1000 (SPEC 7)."""
    config = from_env()
    assert not config.durable
    assert "chat" not in config.durable
    assert config.durable_migrate is True
    assert config.durable_retention == 86400.0
    assert config.durable_replay_max == 1000
    assert config.envelope_limit("chat") == 7999


@pytest.mark.parametrize("value", ["true", "TRUE", "1", "yes", "on", "*"])
def test_true_makes_every_channel_durable(value: str) -> None:
    """PGWS_DURABLE=true (or `*`) selects every channel."""
    durable = from_env(PGWS_DURABLE=value).durable
    assert durable
    assert "chat" in durable
    assert "anything:else" in durable


@pytest.mark.parametrize("value", ["false", "False", "0", "no", "off"])
def test_false_selects_no_channel(value: str) -> None:
    """PGWS_DURABLE=false (any spelling) is durable mode off."""
    assert not from_env(PGWS_DURABLE=value).durable


def test_a_list_selects_names_and_prefix_families() -> None:
    """`chat, room:*` selects chat and room:1, not chats or rooms."""
    config = from_env(PGWS_DURABLE=" chat , room:* ,")
    assert "chat" in config.durable
    assert "room:1" in config.durable
    assert "room:" in config.durable
    assert "chats" not in config.durable
    assert "rooms" not in config.durable
    assert config.envelope_limit("chat") == 16 * 1024 * 1024
    assert config.envelope_limit("rooms") == 7999
    assert str(config.durable) == "chat,room:*"


def test_the_setting_reads_back_the_same_from_its_canonical_text() -> None:
    """str() of a selection is a value that gives the same selection (the settings log line)."""
    for value in ("true", "false", "b,a,x:*"):
        selection = channel_set("PGWS_DURABLE", value)
        assert channel_set("PGWS_DURABLE", str(selection)) == selection


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("PGWS_DURABLE", "maybe*x", "'*' may only end"),
        ("PGWS_DURABLE", "a**", "'*' may only end"),
        ("PGWS_DURABLE", " , ,", "expected true, false or a list"),
        ("PGWS_DURABLE", "x" * 64, "at most 63 bytes"),
        ("PGWS_DURABLE", "x" * 63 + "*", "at most 63 bytes"),
        ("PGWS_DURABLE", "tab\there", "control characters"),
        ("PGWS_DURABLE_MIGRATE", "sometimes", "expected true or false"),
        ("PGWS_DURABLE_RETENTION", "0", "more than 0"),
        ("PGWS_DURABLE_RETENTION", "-5", "more than 0"),
        ("PGWS_DURABLE_RETENTION", "a day", "expected a number of seconds"),
        ("PGWS_DURABLE_RETENTION", "nan", "more than 0"),
        ("PGWS_DURABLE_RETENTION", "inf", "at most"),
        ("PGWS_DURABLE_REPLAY_MAX", "-1", "between 0 and 1000000"),
        ("PGWS_DURABLE_REPLAY_MAX", "lots", "expected an integer"),
    ],
)
def test_bad_durable_values_are_one_config_error_naming_the_variable(
    name: str, value: str, problem: str
) -> None:
    """Each bad value is a ConfigError naming its variable: one line, exit 78."""
    with pytest.raises(ConfigError, match=problem) as caught:
        from_env(**{name: value})
    assert caught.value.name == name
    assert caught.value.exit_code == 78


def test_serve_exits_78_with_one_line_on_a_bad_durable_setting() -> None:
    """`pgws serve` with PGWS_DURABLE_REPLAY_MAX=lots: one `Error:` line on stderr, exit 78."""
    result = run_pgws("serve", env={**REQUIRED, "PGWS_DURABLE_REPLAY_MAX": "lots"})
    assert result.returncode == 78
    lines = result.stderr.strip().splitlines()
    assert lines == ["Error: PGWS_DURABLE_REPLAY_MAX: expected an integer, got 'lots'"]


def test_serve_help_describes_the_durable_settings() -> None:
    """`pgws serve --help` lists the four durable settings with their defaults."""
    result = run_pgws("serve", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for name in (
        "PGWS_DURABLE ",
        "PGWS_DURABLE_MIGRATE",
        "PGWS_DURABLE_RETENTION",
        "PGWS_DURABLE_REPLAY_MAX",
    ):
        assert name.strip() in text


@given(st.text(max_size=80))
def test_any_durable_value_is_a_selection_or_a_config_error(value: str) -> None:
    """Whatever PGWS_DURABLE holds, it parses to a ChannelSet or raises ConfigError."""
    with contextlib.suppress(ConfigError):
        assert isinstance(channel_set("PGWS_DURABLE", value), ChannelSet)
