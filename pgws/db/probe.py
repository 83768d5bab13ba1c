"""What `pgws check` asks the database: can pgws connect, LISTEN and NOTIFY as configured."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from pgws.config import Config
from pgws.db.connect import connection_kwargs, db_target, with_retries

# Past this, every NOTIFY in the database is close to failing ("queue is full").
QUEUE_WARNING = 0.5


async def probe_database(config: Config) -> list[tuple[str, str, bool]]:
    """(what, detail, ok) for the connection, LISTEN and NOTIFY; raises as `serve` would.

    ConfigError for what no retry fixes (bad URI, password, missing database), after one attempt;
    DatabaseUnavailable when the database cannot be reached. The NOTIFY is rolled back, so no
    running pgws sees it.
    """
    where = db_target(config.db_uri)

    async def connect() -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(
            config.db_uri, **connection_kwargs(config.db_uri, "pgws-check")
        )

    conn: psycopg.AsyncConnection[Any] = await with_retries("check", 1, connect, where=where)
    async with conn:
        info = conn.info
        version = info.parameter_status("server_version") or "?"
        findings = [("database", f"{where}, PostgreSQL {version}, role {info.user}", True)]
        channel = sql.Identifier(config.listen_channel)
        try:
            await conn.execute(sql.SQL("LISTEN {}").format(channel))
            await conn.execute(sql.SQL("UNLISTEN {}").format(channel))
            await conn.commit()
            findings.append(("listen", f"LISTEN {config.listen_channel!r}", True))
        except psycopg.Error as exc:
            await conn.rollback()
            findings.append(("listen", f"LISTEN refused: {exc.diag.message_primary}", False))
        try:
            cursor = await conn.execute(
                "SELECT pg_notify(%s, ''), pg_notification_queue_usage()",
                (config.listen_channel,),
            )
            row = await cursor.fetchone()
            await conn.rollback()  # never delivered
            usage = float(row[1]) if row else 0.0
            findings.append(
                (
                    "notify",
                    f"pg_notify works (rolled back); notification queue {usage:.1%} full",
                    usage < QUEUE_WARNING,
                )
            )
        except psycopg.Error as exc:
            await conn.rollback()
            findings.append(("notify", f"pg_notify refused: {exc.diag.message_primary}", False))
    return findings
