"""What `pgws check` asks the database: can pgws connect, LISTEN and NOTIFY as configured, is
there room for its connections, and in which state is the durable schema."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from pgws.config import Config
from pgws.db.connect import connection_kwargs, db_target, with_retries

Result = tuple[str, str, str]  # (what, detail, status: "ok", "warn" or "FAIL")

# Past this, every NOTIFY in the database is close to failing ("queue is full").
QUEUE_WARNING = 0.5


async def probe_database(config: Config) -> list[Result]:
    """(what, detail, status) for the connection, LISTEN, NOTIFY, the connections pgws will
    open and the durable schema; status is `ok`, `warn` or `FAIL`. Raises as `serve` would.

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
        findings = [("database", f"{where}, PostgreSQL {version}, role {info.user}", "ok")]
        channel = sql.Identifier(config.listen_channel)
        try:
            await conn.execute(sql.SQL("LISTEN {}").format(channel))
            await conn.execute(sql.SQL("UNLISTEN {}").format(channel))
            await conn.commit()
            findings.append(("listen", f"LISTEN {config.listen_channel!r}", "ok"))
        except psycopg.Error as exc:
            await conn.rollback()
            findings.append(("listen", f"LISTEN refused: {exc.diag.message_primary}", "FAIL"))
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
                    "ok" if usage < QUEUE_WARNING else "FAIL",
                )
            )
        except psycopg.Error as exc:
            await conn.rollback()
            findings.append(("notify", f"pg_notify refused: {exc.diag.message_primary}", "FAIL"))
        findings.append(await _connection_budget(conn, config))
        findings.append(await _durable_schema(conn, config))
        await conn.rollback()
    return findings


async def _connection_budget(conn: psycopg.AsyncConnection[Any], config: Config) -> Result:
    """Whether the server and the role leave room for the connections pgws opens.

    Each process holds one LISTEN connection and PGWS_POOL_SIZE senders. Not enough room is a
    warning: serve starts, and fails only once the connections run out.
    """
    needed = config.workers * (config.pool_size + 1)
    cursor = await conn.execute(
        "SELECT current_setting('max_connections')::int"
        " - current_setting('superuser_reserved_connections')::int,"
        " (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'),"
        " (SELECT rolconnlimit FROM pg_roles WHERE rolname = current_user),"
        " (SELECT count(*) FROM pg_stat_activity WHERE usename = current_user)"
    )
    row = await cursor.fetchone()
    if row is None:
        return ("connections", "cannot read max_connections", "warn")
    allowed, in_use, role_limit, role_in_use = (int(value) for value in row)
    # This check's own connection is counted as in use but goes away.
    free = allowed - in_use + 1
    role_free = None if role_limit < 0 else role_limit - role_in_use + 1
    per = f"1 LISTEN + {config.pool_size} NOTIFY per process, {config.workers} processes"
    detail = f"pgws needs {needed} ({per}); {free} free of {allowed}"
    if role_free is not None:
        detail += f", the role may open {role_free} more"
    short = needed > free or (role_free is not None and needed > role_free)
    return ("connections", detail, "warn" if short else "ok")


async def _durable_schema(conn: psycopg.AsyncConnection[Any], config: Config) -> Result:
    """The `pgws` schema of durable channels (SPEC 7): absent, current, or not this version.

    With durable channels off it is only reported. With them on, what would stop `serve` is a
    FAIL: a newer schema, or (PGWS_DURABLE_MIGRATE=false) a missing or older one; with
    migration on, a missing or older schema is fine, serve creates or upgrades it.
    """
    from pgws.db.durable_schema import (
        SCHEMA_VERSION,
        installed_version,
    )  # only `check` needs it here

    on, migrates = bool(config.durable), config.durable_migrate
    try:
        version = await installed_version(conn)
    except psycopg.Error as exc:
        await conn.rollback()
        return ("durable", f"cannot read schema pgws: {exc.diag.message_primary}",
                "FAIL" if on else "warn")  # fmt: skip
    if version is None:
        if not on:
            return ("durable", "no schema pgws (durable channels unused; `pgws migrate` makes it)",
                    "ok")  # fmt: skip
        if migrates:
            return ("durable", "no schema pgws yet: serve creates it (PGWS_DURABLE_MIGRATE)", "ok")
        return ("durable", "no schema pgws and PGWS_DURABLE_MIGRATE=false: run `pgws migrate`",
                "FAIL")  # fmt: skip
    if version == SCHEMA_VERSION:
        cursor = await conn.execute(
            "SELECT has_schema_privilege('pgws', 'USAGE'),"
            " has_table_privilege('pgws.schema_version', 'SELECT')"
        )
        row = await cursor.fetchone()
        if row is None or not all(row):
            return ("durable", f"schema pgws at version {version}, but this role may not use it",
                    "FAIL" if on else "warn")  # fmt: skip
        return ("durable", f"schema pgws at version {version}, current", "ok")
    if version < SCHEMA_VERSION:
        if on and migrates:
            return ("durable", f"schema pgws at version {version}: serve upgrades it to"
                    f" {SCHEMA_VERSION} (PGWS_DURABLE_MIGRATE)", "ok")  # fmt: skip
        return ("durable", f"schema pgws at version {version}, older than {SCHEMA_VERSION}:"
                " run `pgws migrate`", "FAIL" if on else "warn")  # fmt: skip
    return ("durable", f"schema pgws at version {version}, newer than this pgws knows"
            f" ({SCHEMA_VERSION}): upgrade pgws", "FAIL" if on else "warn")  # fmt: skip
