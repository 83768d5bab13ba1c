"""The `pgws` command: the click group, and `pgws serve`, which runs the gateway.

`check`, `token` and `migrate` are in `commands`. The CLI modules are the only ones that read
os.environ and the only ones that decide exit statuses (each error class carries its own: 78
EX_CONFIG for a bad setting, 69 EX_UNAVAILABLE when the database cannot be reached or the LISTEN
connection is lost without self-healing).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import click
import structlog

from pgws import __version__, gctune, logs
from pgws.claims import Verifier
from pgws.cli_env import env_file_option, fail, load_env
from pgws.commands import check, migrate, token
from pgws.config import SETTINGS, WORKER_COUNT, WORKERS, Config
from pgws.db.connect import check_db_uri, masked_db_uri
from pgws.errors import ConfigError, PgwsError, first_pgws_error
from pgws.jwks import JwksKeys
from pgws.net import tls_context
from pgws.process import run
from pgws.settings_log import effective_settings, unknown_settings
from pgws.settings_ops import DEBUG, LOG_LEVEL, LOG_LEVELS
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


# sysexits.h: an internal software error (78 EX_CONFIG and 69 EX_UNAVAILABLE come with errors).
EX_SOFTWARE = 70


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pgws")
def cli() -> None:
    """pgws: WebSockets on top of PostgreSQL LISTEN/NOTIFY."""


for _command in (check, token, migrate):
    cli.add_command(_command)


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


def main() -> None:
    """Console-script entry point."""
    cli.main(prog_name="pgws")
