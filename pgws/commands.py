"""`pgws check`, `pgws token` and `pgws migrate`: the commands beside `serve` (in `cli`).

Each reads the settings it needs as `serve` would (`cli_env.load_env`), and fails with one
line and the error's exit status.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from pgws.check import Finding, database_findings, static_findings
from pgws.claims import Verifier, issue_token
from pgws.cli_env import env_file_option, fail, load_env
from pgws.config import DB_URI, SETTINGS, Config, read_jwt_secret
from pgws.db.connect import check_db_uri
from pgws.envfile import credentials_env_file
from pgws.errors import ConfigError, PgwsError
from pgws.settings_auth import JWT_JWKS_URL
from pgws.settings_log import unknown_settings


@click.command()
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


def _parse_claim(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise click.BadParameter(f"expected key=value, got {text!r}")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw  # plain text is a string claim
    return key, value


@click.command()
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


@click.command()
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
    from pgws.db.durable_schema import migrate_database, schema_sql

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
