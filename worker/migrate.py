"""Applies schema.sql and triggers/*.sql, idempotently, one migrator at a time."""

from __future__ import annotations

import logging

import asyncpg

from worker.errors import ConfigError
from worker.sqlfiles import Names, migration_sql

log = logging.getLogger("outbox.migrate")


async def migrate(conn: asyncpg.Connection, names: Names) -> bool:
    """Create or upgrade the schema; True when it had no intent table before."""
    # Two workers starting at once would race on CREATE ... IF NOT EXISTS (it is not
    # atomic against a concurrent creator); the transaction-scoped advisory lock
    # serialises them and is released at commit, even if we crash.
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))", f"outbox-worker migrate {names.schema}"
        )
        created = not await schema_exists(conn, names)
        await conn.execute(migration_sql(names))
    log.info("schema %s %s", names.schema, "created" if created else "is up to date")
    return created


async def schema_exists(conn: asyncpg.Connection | asyncpg.Pool, names: Names) -> bool:
    # A query on the catalog, not to_regclass(): a session's name lookups are cached, and a
    # cached "no such table" survives the wait for migrate's advisory lock (invalidations
    # are read when a relation is locked), so a second migrator would think it created it.
    return bool(await conn.fetchval(_TABLE_EXISTS, names.schema))


_TABLE_EXISTS = """
SELECT EXISTS (SELECT FROM pg_catalog.pg_class c
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname = $1 AND c.relname = 'intent')
"""


async def ensure_schema(conn: asyncpg.Connection, names: Names, *, apply: bool) -> None:
    """Migrate when asked (--migrate, or a database of our own); else refuse a database
    without the intent table in one line, before anything trips over it."""
    if apply:
        await migrate(conn, names)
    elif not await schema_exists(conn, names):
        raise ConfigError(
            f"table {names.schema}.intent does not exist: run `outbox-worker migrate` "
            "(or start the worker with --migrate)"
        )
