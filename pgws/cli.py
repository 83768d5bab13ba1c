"""The `pgws` command: `pgws serve` runs the gateway, `pgws token` mints a token for testing.

This is the only module that reads os.environ and the only one that decides exit statuses (each
error class carries its own: 78 EX_CONFIG for a bad setting, 69 EX_UNAVAILABLE when the database
cannot be reached or the LISTEN connection is lost without self-healing).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

import click
import structlog

from pgws import __version__, gctune, logs
from pgws.check import Finding, database_findings, static_findings
from pgws.claims import Verifier, issue_token
from pgws.config import (
    DB_URI,
    DEBUG,
    JWT_JWKS_URL,
    LOG_LEVEL,
    LOG_LEVELS,
    SETTINGS,
    WORKER_COUNT,
    WORKERS,
    Config,
    read_jwt_secret,
)
from pgws.db.connect import check_db_uri, masked_db_uri
from pgws.envfile import credentials_env_file, parse_env_file
from pgws.errors import ConfigError, PgwsError, first_pgws_error
from pgws.jwks import JwksKeys
from pgws.net import tls_context
from pgws.server import run
from pgws.settings_log import effective_settings, unknown_settings
from pgws.systemd import SystemdNotifier
from pgws.workers import (
    bind_to_supervisor,
    parent_pipe,
    shared_listener_name,
    supervise,
    worker_id,
)

log = structlog.get_logger("pgws.cli")


def _settings_help() -> str:
    lines = ["\b", "Settings (environment variables; the environment wins over --env-file):"]
    for setting in SETTINGS:
        if setting.required:
            default = "required"
        elif setting.default:
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


# sysexits.h: an internal software error (78 EX_CONFIG and 69 EX_UNAVAILABLE come with errors).
EX_SOFTWARE = 70


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
    " $CREDENTIALS_DIRECTORY/env when the unit passes it"
    " (LoadCredential=env:/etc/pgws/pgws.env).",
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
    type=click.IntRange(WORKER_COUNT.minimum, WORKER_COUNT.maximum),
    default=None,
    help="Processes sharing the port (overrides PGWS_WORKERS).",
)
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default=None,
    help="Least severe lines logged (overrides PGWS_LOG_LEVEL; errors always show).",
)
def serve(
    env_file: Path | None, json_logs: bool | None, workers: int | None, log_level: str | None
) -> None:
    """Run the gateway. SIGHUP reloads the JWT secret and TLS files; SIGTERM or SIGQUIT stops."""
    phase = ["at start-up"]
    try:
        serve_gateway(env_file, json_logs, workers, log_level, phase)
    except Exception as exc:
        # The last resort: a bug or an odd environment. Its traceback could show the database
        # URI or the secret, so it is printed only on request.
        if debug_requested(env_file):
            raise
        click.echo(
            f"pgws: internal error {phase[0]}: {exception_types(exc)}"
            " (run with PGWS_DEBUG=1 to see the traceback, which may show secrets)",
            err=True,
        )
        sys.exit(EX_SOFTWARE)


def exception_types(exc: BaseException) -> str:
    """`OSError`, or `ExceptionGroup(OSError, ValueError)`: the types only, never a message."""
    if isinstance(exc, BaseExceptionGroup):
        inner = sorted({exception_types(member) for member in exc.exceptions})
        return f"{type(exc).__name__}({', '.join(inner)})"
    return type(exc).__name__


def debug_requested(env_file: Path | None) -> bool:
    """PGWS_DEBUG from the environment or the env file (unreadable file: the environment)."""
    try:
        env = load_env(env_file)
    except ConfigError:
        env = dict(os.environ)
    try:
        return DEBUG.read(env)
    except ConfigError:
        return False  # the last resort must not fail in turn


def serve_gateway(
    env_file: Path | None,
    json_logs: bool | None,
    workers: int | None,
    log_level: str | None,
    phase: list[str],
) -> None:
    """`pgws serve` itself; `phase[0]` says where it is, for the internal error line."""

    def read_settings() -> tuple[Config, dict[str, str]]:
        env = load_env(env_file)
        if workers is not None:
            env[WORKERS.name] = str(workers)
        if log_level is not None:
            env[LOG_LEVEL.name] = log_level
        return Config.from_env(env, check_db_uri=check_db_uri), env

    def reload_config() -> Config:
        # On SIGHUP: --env-file and @FILE values are read again, the environment is not.
        config, env = read_settings()
        warn_unknown_settings(env)
        return config

    jwks: JwksKeys | None = None
    try:
        config, env = read_settings()
        ident = worker_id(os.environ)
        if ident is None:
            # Everything the gateway (or a worker) would refuse is refused here, before the first
            # log line, so that a bad setting is one line on stderr.
            if config.jwt_jwks_url is None:
                Verifier.from_secret(config.jwt_secret)
            else:  # fetched once, here; workers fetch their own (or read the cache)
                jwks = JwksKeys.from_config(config)
                jwks.load()
            tls_context(config)
    except ConfigError as exc:
        fail(exc)
    logs.configure(json=json_logs, level=logging.getLevelNamesMapping()[config.log_level.upper()])
    if ident is None:  # workers would repeat what their supervisor says
        warn_unknown_settings(env)
        log.info("settings", settings=effective_settings(config, mask_db_uri=masked_db_uri))
    systemd = SystemdNotifier.from_env(os.environ)

    def serving() -> None:
        phase[0] = "while serving"

    try:
        if config.workers > 1 and ident is None:
            # Workers read the env file themselves, so that they can read it again on SIGHUP.
            worker_args: tuple[str, ...] = (
                ("--env-file", str(env_file.absolute())) if env_file else ()
            )
            if log_level is not None:
                worker_args += ("--log-level", log_level)
            sys.exit(asyncio.run(supervise(config, os.environ, systemd, worker_args, serving)))
        if ident is not None:
            structlog.contextvars.bind_contextvars(worker=ident)
            bind_to_supervisor(os.environ)
        gctune.tune()  # the serving process itself (one, or each worker), not the supervisor
        with event_loop_runner(config.uvloop) as runner:
            runner.run(
                run(
                    config,
                    systemd,
                    reuse_port=ident is not None,
                    shared_listener=shared_listener_name(os.environ),
                    worker=ident,
                    parent_pipe=parent_pipe(os.environ),
                    reload_config=reload_config,
                    on_ready=serving,
                    jwks=jwks,
                )
            )
    except (PgwsError, BaseExceptionGroup) as exc:
        if (error := first_pgws_error(exc)) is None:
            raise  # to serve()'s last resort
        fail(error)


@cli.command()
@env_file_option
def check(env_file: Path | None) -> None:
    """Check the settings, keys, TLS files and database as `serve` would, then exit.

    Prints one line per check; exits 0 when all pass, 78 for a bad setting, 69 when the database
    cannot be reached, 1 when it refuses LISTEN or NOTIFY. Suits ExecStartPre= and deploy CI.
    """
    try:
        env = load_env(env_file)
        config = Config.from_env(env, check_db_uri=check_db_uri)
        findings = [Finding("settings", f"{len(SETTINGS)} known; {describe_source(env_file)}")]
        findings += [
            Finding(
                "settings",
                f"{name} is no setting, ignored" + (f" (did you mean {guess}?)" if guess else ""),
                "warn",
            )
            for name, guess in unknown_settings(env)
        ]
        findings += static_findings(config)
        findings += asyncio.run(database_findings(config))
    except PgwsError as exc:
        fail(exc)
    for finding in findings:
        click.echo(finding.line())
    if any(finding.failed for finding in findings):
        sys.exit(1)


def describe_source(env_file: Path | None) -> str:
    """Where the settings came from, for the report."""
    if env_file is not None:
        return f"env file {env_file}"
    if (credential := credentials_env_file(os.environ)) is not None:
        return f"env file {credential} (systemd credential)"
    return "environment only"


def warn_unknown_settings(env: Mapping[str, str]) -> None:
    """One warning per PGWS_* name that is no setting, with the likely intended one."""
    for name, guess in unknown_settings(env):
        log.warning("setting_unknown", name=name, did_you_mean=guess, action="ignored")


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
        verifier = signing_verifier(load_env(env_file))
        click.echo(issue_token(verifier, claims, ttl=ttl if ttl > 0 else None))
    except ConfigError as exc:
        fail(exc)


def signing_verifier(env: Mapping[str, str]) -> Verifier:
    """The keys `pgws token` signs with: PGWS_JWT_SECRET's (a JWKS URL's keys cannot sign)."""
    if JWT_JWKS_URL.read(env) is not None:
        raise ConfigError(
            JWT_JWKS_URL.name, "holds the provider's public keys, which cannot sign tokens"
        )
    return Verifier.from_secret(read_jwt_secret(env))


def main() -> None:
    """Console-script entry point."""
    cli.main(prog_name="pgws")


@cli.command()
@env_file_option
@click.option(
    "--print",
    "print_sql",
    is_flag=True,
    help="Print the SQL instead of applying it (for a DBA; needs no database).",
)
def migrate(env_file: Path | None, print_sql: bool) -> None:
    """Create or upgrade the `pgws` schema of durable channels in PGWS_DB_URI's database.

    Safe to run again and from several processes at once. Durable channels are a preview: the
    schema and its SQL functions exist, sockets do not use them yet.
    """
    # Imported here: the other commands do not need the durable store.
    from pgws.db.durable import migrate_database, schema_sql

    if print_sql:
        click.echo(schema_sql(), nl=False)
        return
    # PGWS_DB_URI alone, read as `serve` reads it (@FILE too): migrating needs no JWT secret.
    try:
        env = load_env(env_file)
        db_uri = DB_URI.read(env)
        check_db_uri(db_uri)
        done = asyncio.run(migrate_database(db_uri))
    except PgwsError as exc:
        fail(exc)
    click.echo(f"pgws migrate: {done.describe()}")
