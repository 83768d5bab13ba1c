"""The `pgws` command: `pgws serve` runs the gateway, `pgws token` mints a token for testing.

This is the only module that reads os.environ and the only one that decides exit statuses (each
error class carries its own: 78 EX_CONFIG for a bad setting, 69 EX_UNAVAILABLE when the database
cannot be reached or the LISTEN connection is lost without self-healing).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from pgws import __version__, logs
from pgws.claims import Verifier, issue_token
from pgws.config import SETTINGS, Config, parse_env_file, read_jwt_secret
from pgws.errors import ConfigError, PgwsError, first_pgws_error
from pgws.server import run
from pgws.systemd import SystemdNotifier


def _settings_help() -> str:
    lines = ["\b", "Settings (environment variables; the environment wins over --env-file):"]
    for setting in SETTINGS:
        default = (
            "required"
            if setting.default is None and "required" in setting.help
            else (f"default {setting.default}" if setting.default is not None else "unset")
        )
        lines.append(f"  {setting.name:<30} {setting.help} ({default})")
    return "\n".join(lines)


def load_env(env_file: Path | None) -> dict[str, str]:
    """The process environment over the env file's values."""
    values = parse_env_file(env_file) if env_file is not None else {}
    return {**values, **os.environ}


def fail(error: PgwsError) -> NoReturn:
    """Print one line to stderr and exit with the error's status; never a traceback."""
    click.echo(f"Error: {error}", err=True)
    sys.exit(error.exit_code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pgws")
def cli() -> None:
    """pgws: WebSockets on top of PostgreSQL LISTEN/NOTIFY."""


env_file_option = click.option(
    "--env-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Read KEY=value settings from this file (sample-env format).",
)


@cli.command(epilog=_settings_help())
@env_file_option
@click.option(
    "--json-logs/--console-logs",
    default=None,
    help="Log format (default: JSON unless stderr is a terminal).",
)
def serve(env_file: Path | None, json_logs: bool | None) -> None:
    """Run the gateway."""
    try:
        config = Config.from_env(load_env(env_file))
    except ConfigError as exc:
        fail(exc)
    logs.configure(json=json_logs)
    try:
        asyncio.run(run(config, SystemdNotifier.from_env(os.environ)))
    except (PgwsError, BaseExceptionGroup) as exc:
        if (error := first_pgws_error(exc)) is None:
            raise
        fail(error)


def _parse_claim(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise click.BadParameter(f"expected key=value, got {text!r}")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw  # plain text is a string claim
    return key, value


@cli.command()
@env_file_option
@click.option("--mode", type=click.Choice(["r", "w", "rw"]), default="rw", show_default=True)
@click.option(
    "--channel", "channels", multiple=True, help="Allowed channel (repeat; none = any channel)."
)
@click.option(
    "--ttl", type=float, default=3600.0, show_default=True, help="Seconds until exp; 0 = no exp."
)
@click.option(
    "--claim",
    "extra",
    multiple=True,
    help="Extra claim key=value (the value is JSON if it parses).",
)
def token(
    env_file: Path | None, mode: str, channels: tuple[str, ...], ttl: float, extra: tuple[str, ...]
) -> None:
    """Print a token signed with PGWS_JWT_SECRET."""
    claims: dict[str, Any] = dict(_parse_claim(item) for item in extra)
    claims["mode"] = mode
    if channels:
        claims["channels"] = list(dict.fromkeys(channels))
    try:
        verifier = Verifier.from_secret(read_jwt_secret(load_env(env_file)))
        click.echo(issue_token(verifier, claims, ttl=ttl if ttl > 0 else None))
    except ConfigError as exc:
        fail(exc)


def main() -> None:
    """Console-script entry point."""
    cli.main(prog_name="pgws")
