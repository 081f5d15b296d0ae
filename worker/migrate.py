"""Applies schema.sql and triggers/*.sql, idempotently, one migrator at a time."""

from __future__ import annotations

import logging

import asyncpg

from worker.sqlfiles import Names, migration_sql, quote_ident

log = logging.getLogger("outbox.migrate")


async def migrate(conn: asyncpg.Connection, names: Names) -> None:
    # Two workers starting at once would race on CREATE ... IF NOT EXISTS (it is not
    # atomic against a concurrent creator); the transaction-scoped advisory lock
    # serialises them and is released at commit, even if we crash.
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))", f"outbox-worker migrate {names.schema}"
        )
        await conn.execute(migration_sql(names))
    log.info("schema %s is up to date", names.schema)


async def schema_exists(conn: asyncpg.Connection | asyncpg.Pool, names: Names) -> bool:
    table = f"{quote_ident(names.schema)}.intent"
    return bool(await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table))
