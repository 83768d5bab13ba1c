"""`make run`: the gateway with sample-env, an embedded PostgreSQL if none is configured, and a
ready-to-use token, URL and SQL printed for trying it out.

Development only: production runs `pgws serve`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from pgws import logs
from pgws.claims import Verifier, issue_token
from pgws.config import Config
from pgws.db.connect import check_db_uri
from pgws.envfile import parse_env_file
from pgws.errors import ConfigError, PgwsError, first_pgws_error
from pgws.process import run

DATA_DIR = Path(".pgdata")


def main() -> int:
    """Start everything, print how to use it, serve until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m dev.demo")
    parser.add_argument("--env-file", type=Path, default=Path("sample-env"))
    args = parser.parse_args()
    try:
        env = {**parse_env_file(args.env_file), **os.environ}
    except ConfigError as exc:
        print(f"Error: {exc}", file=sys.stderr)  # noqa: T201
        return exc.exit_code
    cluster = None
    if not env.get("PGWS_DB_URI"):
        from dev.devdb import ThrowawayPostgres

        cluster = ThrowawayPostgres(DATA_DIR.resolve())
        cluster.start()
        env["PGWS_DB_URI"] = cluster.uri
    try:
        config = Config.from_env(env, check_db_uri=check_db_uri)
        token = issue_token(
            Verifier.from_secret(config.jwt_secret), {"mode": "rw", "channels": ["chat"]}, ttl=86400
        )
        logs.configure()
        # Only once the port listens: before that the banner's URLs would be refused.
        asyncio.run(
            run(
                config, on_ready=lambda: _print_welcome(config, token, embedded=cluster is not None)
            )
        )
    except (PgwsError, BaseExceptionGroup) as exc:
        if (error := first_pgws_error(exc)) is None:
            raise
        print(f"Error: {error}", file=sys.stderr)  # noqa: T201
        return error.exit_code
    except KeyboardInterrupt:
        pass
    finally:
        if cluster is not None:
            cluster.stop()
    return 0


def _print_welcome(config: Config, token: str, *, embedded: bool) -> None:
    host = "localhost" if config.host in ("*4", "*6", "*", "!4", "!6") else config.host
    scheme = "wss" if config.tls else "ws"
    http = "https" if config.tls else "http"
    database = f"embedded PostgreSQL in {DATA_DIR}/" if embedded else "PGWS_DB_URI"
    lines = [
        "",
        f"pgws on {http}://{host}:{config.port}/  (database: {database})",
        "Open it in a browser: the chat page connects by itself (two windows chat together).",
        "",
        "A token for channel 'chat' (mode rw, valid 24 h):",
        f"  {token}",
        "Open a socket:",
        f"  {scheme}://{host}:{config.port}/chat/{token}",
        "Send it a message from SQL:",
        f"  SELECT pg_notify('{config.listen_channel}', json_build_object("
        "'event','WebsocketMessage','channel','chat','payload','hello')::text);",
    ]
    if embedded:
        lines.append(f"  (psql -h 127.0.0.1 -p {_port_of(config.db_uri)} -U postgres postgres)")
    lines += [
        "",
        "Ctrl-C stops it. Another port: PGWS_PORT=3001 make run",
        "",
    ]
    print("\n".join(lines), flush=True)  # noqa: T201


def _port_of(uri: str) -> str:
    return uri.rsplit(":", 1)[-1].split("/", 1)[0]


if __name__ == "__main__":
    sys.exit(main())
