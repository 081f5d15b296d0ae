"""Applies the numbered migrations (worker/store/migrations/NNNN_name.sql) a schema has not
had yet, in order, one migrator at a time, and records each in ``schema_version``.

A schema made before versions (by a ``migrate`` that re-ran one idempotent script and kept a
hash of it as the schema's comment) is recognised: if the hash is that of migration 0001,
0001 is recorded as applied without running; otherwise 0001, idempotent like the script it
was, brings the older shape up to it (what that ``migrate`` did). Later migrations are
written to be idempotent too: `outbox-worker schema` prints them all for other tools.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import asyncpg

from worker.errors import ConfigError
from worker.store.grants import PRODUCER, WORKER, privilege_error
from worker.store.sqlfiles import VERSION_TABLE, Migration, Names, migration_sql, migrations

log = logging.getLogger("outbox.migrate")


@dataclass(frozen=True)
class Migrated:
    """What ``migrate`` did: created the schema, applied migrations to it, or nothing."""

    created: bool
    applied: tuple[str, ...]  # "0003_comments", in order

    def __str__(self) -> str:
        if self.created:
            return "created"
        if self.applied:
            return f"upgraded: migration {', '.join(self.applied)} applied"
        return "is up to date"


async def migrate(conn: asyncpg.Connection, names: Names) -> Migrated:
    """Create or upgrade the schema. A schema that is up to date takes no lock at all
    (``--migrate`` runs this at every start)."""
    try:
        result = await _migrate(conn, names)
    except asyncpg.InsufficientPrivilegeError as exc:
        raise ConfigError(
            f"migrate: {exc}: run it as the role that owns schema {names.schema} (for a new "
            "schema, one with CREATE on the database); workers and producers need only what "
            "`outbox-worker grants` prints"
        ) from None
    log.info("schema %s %s", names.schema, result)
    return result


async def _migrate(conn: asyncpg.Connection, names: Names) -> Migrated:
    # Two workers starting at once would race on CREATE ... IF NOT EXISTS (it is not
    # atomic against a concurrent creator); the transaction-scoped advisory lock
    # serialises them and is released at commit, even if we crash.
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))", f"outbox-worker migrate {names.schema}"
        )
        created = not await schema_exists(conn, names)
        run, recorded = await _pending(conn, names)
        if run or recorded:
            await conn.execute(names.render(VERSION_TABLE))
        for m in recorded:
            await conn.execute(m.record(names))
            log.info("schema %s: migration %04d_%s recorded as applied", names.schema, *_id(m))
        for m in run:
            await conn.execute(names.render(m.sql))
            await conn.execute(m.record(names))
            log.info("schema %s: migration %04d_%s applied", names.schema, *_id(m))
    return Migrated(created, tuple(f"{m.version:04d}_{m.name}" for m in run))


async def dry_run(conn: asyncpg.Connection, names: Names) -> str:
    """The SQL ``migrate`` would run now, as a script (nothing is changed)."""
    run, recorded = await _pending(conn, names)
    if not run and not recorded:
        return f"-- schema {names.schema} is up to date: nothing to run"
    notes = [
        f"-- migration {m.version:04d}_{m.name}: already applied (the schema's comment "
        f"matches it), only recorded\n{m.record(names)}"
        for m in recorded
    ]
    return "\n\n".join([migration_sql(names, run), *notes])


def _id(m: Migration) -> tuple[int, str]:
    return m.version, m.name


async def _pending(
    conn: asyncpg.Connection, names: Names
) -> tuple[list[Migration], list[Migration]]:
    """(the migrations to run, those to record only)."""
    every = migrations()
    if not await schema_exists(conn, names):
        return every, []
    applied = await applied_versions(conn, names)
    if applied is None:  # made before versions: see the module's docstring
        first = every[0]
        if await conn.fetchval(_SCHEMA_MARK, names.schema) == _mark(names.render(first.sql)):
            return every[1:], [first]
        return every, []
    return [m for m in every if m.version not in applied], []


def _mark(sql: str) -> str:
    """The comment the migrate before versions left on a schema it made."""
    return f"outbox-worker schema {hashlib.sha256(sql.encode()).hexdigest()[:16]}"


_SCHEMA_MARK = (
    "SELECT obj_description(oid, 'pg_namespace') FROM pg_catalog.pg_namespace WHERE nspname = $1"
)


async def applied_versions(conn: asyncpg.Connection, names: Names) -> set[int] | None:
    """The versions recorded in schema_version; None without that table."""
    if not await conn.fetchval(_RELATION_EXISTS, names.schema, "schema_version"):
        return None
    rows = await conn.fetch(names.render("SELECT version FROM {{schema}}.schema_version"))
    return {r["version"] for r in rows}


async def schema_exists(conn: asyncpg.Connection | asyncpg.Pool, names: Names) -> bool:
    # A query on the catalog, not to_regclass(): a session's name lookups are cached, and a
    # cached "no such table" survives the wait for migrate's advisory lock (invalidations
    # are read when a relation is locked), so a second migrator would think it created it.
    return bool(await conn.fetchval(_RELATION_EXISTS, names.schema, "intent"))


_RELATION_EXISTS = """
SELECT EXISTS (SELECT FROM pg_catalog.pg_class c
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname = $1 AND c.relname = $2)
"""


async def ensure_schema(
    conn: asyncpg.Connection, names: Names, *, apply: bool, producer: bool = False
) -> None:
    """Migrate when asked (--migrate, or a database of our own); else refuse, in one line, a
    database without the intent table or with an older schema, before anything trips over
    it (a rolling upgrade whose migration has not run yet)."""
    if apply:
        await migrate(conn, names)
    elif not await schema_exists(conn, names):
        raise ConfigError(
            f"table {names.schema}.intent does not exist: run `outbox-worker migrate` "
            "(or start the worker with --migrate)"
        )
    else:
        try:
            applied = await applied_versions(conn, names) or set()
        except asyncpg.InsufficientPrivilegeError as exc:
            needed = PRODUCER if producer else WORKER
            raise ConfigError(await privilege_error(conn, names.schema, needed, str(exc))) from None
        missing = [m for m in migrations() if m.version not in applied]
        if missing:
            raise ConfigError(
                f"schema {names.schema} is older than this worker (migration "
                f"{missing[0].version:04d}_{missing[0].name} not applied): run `outbox-worker "
                "migrate` first (or start the worker with --migrate; `migrate --dry-run` shows "
                "the SQL)"
            )
