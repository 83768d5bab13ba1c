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
import structlog

from pgws import __version__, logs
from pgws.claims import Verifier, issue_token
from pgws.config import (
    SETTINGS,
    Config,
    credentials_env_file,
    parse_env_file,
    read_jwt_secret,
)
from pgws.errors import ConfigError, PgwsError, first_pgws_error
from pgws.server import run, tls_context
from pgws.systemd import SystemdNotifier
from pgws.workers import supervise, worker_id


def _settings_help() -> str:
    lines = ["\b", "Settings (environment variables; the environment wins over --env-file):"]
    for setting in SETTINGS:
        if setting.required:
            default = "required"
        elif setting.default is not None:
            default = f"default {setting.default}"
        else:
            default = "unset by default"
        lines.append(f"  {setting.name:<30} {setting.help} ({default})")
    return "\n".join(lines)


def load_env(env_file: Path | None) -> dict[str, str]:
    """The process environment over the env file's values.

    Without --env-file, the file systemd passes as credential `env` (LoadCredential=) is read.
    """
    if env_file is None:
        env_file = credentials_env_file(os.environ)
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
    help="Read KEY=value settings from this file (sample-env format). Default under systemd:"
    " $CREDENTIALS_DIRECTORY/env when the unit passes it (LoadCredential=env:/etc/pgws/env).",
)


@cli.command(epilog=_settings_help())
@env_file_option
@click.option(
    "--json-logs/--console-logs",
    default=None,
    help="Log format (default: JSON unless stderr is a terminal).",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 256),
    default=None,
    help="Processes sharing the port (overrides PGWS_WORKERS).",
)
def serve(env_file: Path | None, json_logs: bool | None, workers: int | None) -> None:
    """Run the gateway."""
    try:
        env = load_env(env_file)
        if workers is not None:
            env["PGWS_WORKERS"] = str(workers)
        config = Config.from_env(env)
        ident = worker_id(os.environ)
        if config.workers > 1 and ident is None:
            # Everything a worker would refuse is refused here, once, before any process starts.
            Verifier.from_secret(config.jwt_secret)
            tls_context(config)
    except ConfigError as exc:
        fail(exc)
    logs.configure(json=json_logs)
    systemd = SystemdNotifier.from_env(os.environ)
    try:
        if config.workers > 1 and ident is None:
            sys.exit(asyncio.run(supervise(config, env, systemd)))
        if ident is not None:
            structlog.contextvars.bind_contextvars(worker=ident)
        with event_loop_runner(config.uvloop) as runner:
            runner.run(run(config, systemd, reuse_port=ident is not None))
    except (PgwsError, BaseExceptionGroup) as exc:
        if (error := first_pgws_error(exc)) is None:
            raise
        fail(error)


def event_loop_runner(use_uvloop: bool) -> asyncio.Runner:
    """An asyncio runner: on uvloop with PGWS_UVLOOP=true, else on asyncio's own loop."""
    if not use_uvloop:
        return asyncio.Runner()
    try:
        import uvloop
    except ImportError:
        raise ConfigError(
            "PGWS_UVLOOP", "is true but uvloop is not installed (pip install 'pgws[fast]')"
        ) from None
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


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
