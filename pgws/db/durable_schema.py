"""The durable store's schema (SPEC 7): durable.sql installed, upgraded or checked.

migrate() works on any connection (inside a caller's transaction too); migrate_database() and
prepare_schema() open their own.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
from typing import Any

import psycopg

from pgws.db.connect import connection_kwargs, db_target, with_retries
from pgws.errors import SchemaMismatch

__all__ = [
    "SCHEMA_VERSION",
    "Migration",
    "installed_version",
    "migrate",
    "migrate_database",
    "prepare_schema",
    "schema_sql",
]

SCHEMA_VERSION = 1
# Advisory lock key ("pgws" in ASCII, then a number; durable has 2): one migration at a time.
_MIGRATION_LOCK = 0x70677773_0001


def _script() -> str:
    return importlib.resources.files("pgws.db").joinpath("durable.sql").read_text("utf-8")


def schema_sql() -> str:
    """The whole schema as one transaction a DBA can review and run (`pgws migrate --print`)."""
    return (
        f"BEGIN;\nSELECT pg_advisory_xact_lock({_MIGRATION_LOCK});\n\n{_script().rstrip()}\n\n"
        "COMMIT;\n"
    )


@dataclasses.dataclass(frozen=True)
class Migration:
    """What migrate() found and left: version None means no pgws schema."""

    before: int | None
    after: int

    def describe(self) -> str:
        if self.before is None:
            return f"created schema pgws at version {self.after}"
        if self.before == self.after:
            return f"schema pgws already at version {self.after}, nothing to do"
        return f"upgraded schema pgws from version {self.before} to {self.after}"


async def installed_version(conn: psycopg.AsyncConnection[Any]) -> int | None:
    """The pgws schema version in the database, or None when there is none."""
    cur = await conn.execute("SELECT to_regclass('pgws.schema_version') IS NOT NULL")
    exists = await cur.fetchone()
    if exists is None or not exists[0]:
        return None
    cur = await conn.execute("SELECT max(version) FROM pgws.schema_version")
    row = await cur.fetchone()
    return None if row is None else row[0]


async def migrate(conn: psycopg.AsyncConnection[Any]) -> Migration:
    """Create or upgrade the schema in one transaction; concurrent callers wait for each other.

    The advisory lock comes before any check, so that of several processes starting at once one
    creates the schema and the others find it done.
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        before = await installed_version(conn)
        if before is not None and before > SCHEMA_VERSION:
            raise SchemaMismatch(
                f"the database's pgws schema is at version {before}, newer than this pgws"
                f" knows ({SCHEMA_VERSION}): upgrade pgws"
            )
        if before != SCHEMA_VERSION:
            await conn.execute(_script().encode())  # no parameters: several statements at once
    return Migration(before, SCHEMA_VERSION)


async def migrate_database(db_uri: str) -> Migration:
    """`pgws migrate`: connect (DatabaseUnavailable, ConfigError as `serve` would), migrate."""
    kwargs = connection_kwargs(db_uri, "pgws migrate")

    async def connect() -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(db_uri, autocommit=True, **kwargs)

    conn: psycopg.AsyncConnection[Any] = await with_retries(
        "migrate", 1, connect, where=db_target(db_uri)
    )
    async with conn:
        return await migrate(conn)


async def prepare_schema(db_uri: str, *, apply: bool, retries: int) -> Migration:
    """`pgws serve` in durable mode: migrate (PGWS_DURABLE_MIGRATE) or check the schema.

    Connects with the start-up retries (DatabaseUnavailable after them). Without `apply`, a
    missing or older schema is SchemaMismatch (exit 78): `pgws migrate` or a DBA has to act.
    """
    kwargs = connection_kwargs(db_uri, "pgws-migrate")

    async def connect() -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(db_uri, autocommit=True, **kwargs)

    conn: psycopg.AsyncConnection[Any] = await with_retries(
        "durable schema", retries, connect, where=db_target(db_uri)
    )
    async with conn:
        if apply:
            return await migrate(conn)
        version = await installed_version(conn)
    if version == SCHEMA_VERSION:
        return Migration(version, version)
    found = "no pgws schema" if version is None else f"the pgws schema at version {version}"
    raise SchemaMismatch(
        f"PGWS_DURABLE_MIGRATE is false and the database has {found}; this pgws needs version"
        f" {SCHEMA_VERSION}: run `pgws migrate` (or `pgws migrate --print` for a DBA)"
    )
