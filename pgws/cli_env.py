"""What every `pgws` command shares: the --env-file option, the settings it reads, one-line errors.

The CLI modules (`cli`, `commands`) are the only ones that read os.environ and decide exit
statuses (each error class carries its own).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

import click

from pgws.envfile import credentials_env_file, parse_env_file
from pgws.errors import PgwsError

env_file_option = click.option(
    "--env-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Read KEY=value settings from this file (sample-env format). Default under systemd:"
    " $CREDENTIALS_DIRECTORY/env when the unit passes it"
    " (LoadCredential=env:/etc/pgws/pgws.env).",
)


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
