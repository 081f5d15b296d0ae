"""Applies schema.sql and triggers/*.sql, idempotently, one migrator at a time."""

from __future__ import annotations

import hashlib
import logging

import asyncpg

from worker.errors import ConfigError
from worker.store.sqlfiles import Names, migration_sql, quote_ident, quote_literal

log = logging.getLogger("outbox.migrate")


async def migrate(conn: asyncpg.Connection, names: Names, *, force: bool = True) -> bool:
    """Create or upgrade the schema; True when it had no intent table before. Without
    ``force`` (a worker's --migrate at every start), SQL already applied is not run again."""
    try:
        created = await _migrate(conn, names, force=force)
    except asyncpg.InsufficientPrivilegeError as exc:
        raise ConfigError(
            f"migrate: {exc}: run it as the role that owns schema {names.schema} (for a new "
            "schema, one with CREATE on the database); workers and producers need only what "
            "`outbox-worker grants` prints"
        ) from None
    log.info("schema %s %s", names.schema, "created" if created else "is up to date")
    return created


async def _migrate(conn: asyncpg.Connection, names: Names, *, force: bool) -> bool:
    # Two workers starting at once would race on CREATE ... IF NOT EXISTS (it is not
    # atomic against a concurrent creator); the transaction-scoped advisory lock
    # serialises them and is released at commit, even if we crash.
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))", f"outbox-worker migrate {names.schema}"
        )
        created = not await schema_exists(conn, names)
        sql = migration_sql(names)
        mark = f"outbox-worker schema {hashlib.sha256(sql.encode()).hexdigest()[:16]}"
        # The same SQL applied before: skip it. Re-running it would be harmless but for its
        # locks (ALTER TABLE, CREATE INDEX, CREATE TRIGGER lock the table even when there is
        # nothing to do), which would queue producers behind any long transaction.
        if force or created or await conn.fetchval(_SCHEMA_MARK, names.schema) != mark:
            await conn.execute(sql)
            await conn.execute(
                f"COMMENT ON SCHEMA {quote_ident(names.schema)} IS {quote_literal(mark)}"
            )
    return created


# What the last migration wrote on the schema: a hash of the SQL it applied.
_SCHEMA_MARK = (
    "SELECT obj_description(oid, 'pg_namespace') FROM pg_catalog.pg_namespace WHERE nspname = $1"
)


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


# The column the newest schema.sql added: a table without it is older than this worker,
# whose queries name it (move it on with the next column a migration adds).
_NEWEST_COLUMN = "trace_context"

_COLUMN_EXISTS = """
SELECT EXISTS (SELECT FROM pg_catalog.pg_attribute a
               JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname = $1 AND c.relname = 'intent' AND a.attname = $2
                 AND NOT a.attisdropped)
"""


async def ensure_schema(conn: asyncpg.Connection, names: Names, *, apply: bool) -> None:
    """Migrate when asked (--migrate, or a database of our own); else refuse, in one line, a
    database without the intent table or with an older one, before anything trips over it
    (a rolling upgrade whose migration has not run yet)."""
    if apply:
        await migrate(conn, names, force=False)
    elif not await schema_exists(conn, names):
        raise ConfigError(
            f"table {names.schema}.intent does not exist: run `outbox-worker migrate` "
            "(or start the worker with --migrate)"
        )
    elif not await conn.fetchval(_COLUMN_EXISTS, names.schema, _NEWEST_COLUMN):
        raise ConfigError(
            f"table {names.schema}.intent is older than this worker: run `outbox-worker "
            "migrate` first (or start the worker with --migrate)"
        )
