"""Versioned migrations: every earlier shape of the schema in this repository's history (the
copies in tests/schema_history/, as `git log -- schema.sql triggers/` shows them), with
rows in it, upgrades to exactly what a fresh schema is (the catalog compared: columns,
types, defaults, indexes, constraints, functions, triggers, views), without a rewrite of the
table; and schema.sql with triggers/ at the top equals the migrations applied in order."""

from __future__ import annotations

import hashlib
import secrets
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

from tests.fault.workers import worker_env
from worker.settings import default_channel
from worker.store.migrate import dry_run, migrate, schema_exists
from worker.store.sqlfiles import Names, migration_sql, migrations

REPO = Path(__file__).resolve().parent.parent
HISTORY = sorted(
    (REPO / "tests" / "schema_history").glob("*.sql"), key=lambda p: int(p.name.split("_")[0])
)
SHAPES = {path: path.read_text() for path in HISTORY}


def readable_schema(names: Names) -> str:
    """schema.sql and triggers/*.sql at the top of the repository, rendered."""
    files = [REPO / "schema.sql", *sorted((REPO / "triggers").glob("*.sql"))]
    return "\n".join(names.render(f.read_text()) for f in files)


# One query per kind of object; every name of the schema is replaced by S before comparing.
_CATALOG = {
    "tables": """SELECT c.relname, c.relkind, c.relpersistence FROM pg_class c
                 WHERE c.relnamespace = $1::regnamespace AND c.relkind IN ('r', 'v', 'S')""",
    "columns": """SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                         pg_get_expr(d.adbin, d.adrelid), a.attidentity
                  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
                  LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                  WHERE c.relnamespace = $1::regnamespace AND a.attnum > 0
                    AND NOT a.attisdropped AND c.relkind IN ('r', 'v')""",
    "constraints": """SELECT c.conname, c.contype, pg_get_constraintdef(c.oid) FROM pg_constraint c
                      WHERE c.connamespace = $1::regnamespace""",
    "indexes": """SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = $2""",
    "functions": """SELECT p.proname, pg_get_function_arguments(p.oid),
                           pg_get_function_result(p.oid), p.prosecdef, p.proconfig, p.provolatile,
                           regexp_replace(p.prosrc, '\\s+', ' ', 'g')
                    FROM pg_proc p WHERE p.pronamespace = $1::regnamespace""",
    "triggers": """SELECT t.tgname, pg_get_triggerdef(t.oid) FROM pg_trigger t
                   JOIN pg_class c ON c.oid = t.tgrelid
                   WHERE c.relnamespace = $1::regnamespace AND NOT t.tgisinternal""",
    "views": """SELECT c.relname, pg_get_viewdef(c.oid) FROM pg_class c
                WHERE c.relnamespace = $1::regnamespace AND c.relkind = 'v'""",
    # COMMENT ON anything in the schema (a trigger's identity names its table's schema); not
    # the schema's own comment, the mark of the migrate from before versions.
    "comments": """SELECT o.type, o.identity, d.description
                   FROM pg_description d, pg_identify_object(d.classoid, d.objoid, d.objsubid) o
                   WHERE d.classoid <> 'pg_namespace'::regclass
                     AND (o.schema = $2 OR o.identity LIKE '% on ' || quote_ident($2) || '.%')""",
}


async def catalog(conn: asyncpg.Connection, schema: str) -> dict[str, list[tuple[Any, ...]]]:
    quoted = f'"{schema}"'
    found = {}
    for kind, query in _CATALOG.items():
        args = (schema,) if "$2" in query else (quoted,)
        rows = await conn.fetch(query.replace("$2", "$1"), *args)
        found[kind] = sorted(
            tuple(v.replace(schema, "S") if isinstance(v, str) else v for v in r) for r in rows
        )
    return found


@pytest.fixture
async def new_names(conn: asyncpg.Connection) -> AsyncIterator[Callable[[], Names]]:
    """Names of fresh schemas, dropped at the end."""
    made: list[str] = []

    def make() -> Names:
        made.append(f"m_{secrets.token_hex(5)}")
        return Names(made[-1], default_channel(made[-1]))

    yield make
    for schema in made:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


async def test_the_readable_schema_is_the_migrations_applied_in_order(conn, new_names):
    fresh, migrated = new_names(), new_names()
    await conn.execute(readable_schema(fresh))
    assert (await migrate(conn, migrated)).created
    assert await catalog(conn, migrated.schema) == await catalog(conn, fresh.schema)
    versions = await conn.fetch(f'SELECT version, name FROM "{migrated.schema}".schema_version')
    assert [tuple(v) for v in sorted(versions)] == [(m.version, m.name) for m in migrations()]
    assert "{{" not in migration_sql(migrated)


@pytest.mark.parametrize("shape", HISTORY, ids=[p.stem for p in HISTORY])
async def test_each_earlier_shape_upgrades_to_the_fresh_schema_with_its_rows(
    conn, new_names, shape: Path
):
    fresh, old = new_names(), new_names()
    await conn.execute(readable_schema(fresh))
    sql = old.render(SHAPES[shape])
    await conn.execute(sql)
    if int(shape.name.split("_")[0]) >= 6:
        # From 1c5bb6a on, migrate kept a hash of the SQL it applied as the schema's comment.
        mark = f"outbox-worker schema {hashlib.sha256(sql.encode()).hexdigest()[:16]}"
        await conn.execute(f"COMMENT ON SCHEMA \"{old.schema}\" IS '{mark}'")
    table = f'"{old.schema}".intent'
    await conn.execute(
        f"INSERT INTO {table} (kind, payload) VALUES ('k', '{{\"n\": 1}}');"
        f"INSERT INTO {table} (kind, payload, status, sent_at) VALUES ('k', '{{}}', 'sent', now());"
        f"INSERT INTO {table} (kind, payload, status, last_error) VALUES ('k', '{{}}', 'dead', 'x')"
    )
    before = await conn.fetch(f"SELECT id, kind, payload, status FROM {table} ORDER BY id")
    filenode = await conn.fetchval("SELECT pg_relation_filenode($1::regclass)", table)
    plan = await dry_run(conn, old)
    assert "0002_enqueue_security_definer" in plan and "ALTER FUNCTION" in plan
    assert not (await migrate(conn, old)).created
    assert await catalog(conn, old.schema) == await catalog(conn, fresh.schema)
    after = await conn.fetch(f"SELECT id, kind, payload, status FROM {table} ORDER BY id")
    assert after == before
    # No migration rewrote the table (a rewrite gives it a new file).
    assert await conn.fetchval("SELECT pg_relation_filenode($1::regclass)", table) == filenode
    assert await dry_run(conn, old) == f"-- schema {old.schema} is up to date: nothing to run"
    new_id = await conn.fetchval(
        f"SELECT \"{old.schema}\".enqueue('k', '{{}}', ordering_key => 'o')"
    )
    assert new_id > after[-1]["id"]


async def test_a_schema_made_by_the_last_migrate_before_versions_is_version_1_untouched(
    conn, new_names
):
    """Its hash matches migration 0001: 0001 is recorded, not run again (its triggers, which
    a re-run would drop and create, keep their oids); only the later ones run."""
    old = new_names()
    sql = old.render(SHAPES[HISTORY[-1]])
    await conn.execute(sql)
    mark = f"outbox-worker schema {hashlib.sha256(sql.encode()).hexdigest()[:16]}"
    await conn.execute(f"COMMENT ON SCHEMA \"{old.schema}\" IS '{mark}'")
    triggers = "SELECT array_agg(oid ORDER BY oid) FROM pg_trigger WHERE tgrelid = $1::regclass"
    table = f'"{old.schema}".intent'
    oids = await conn.fetchval(triggers, table)
    plan = await dry_run(conn, old)
    assert "0001_initial: already applied" in plan and "-- migration 0001_initial\n" not in plan
    await migrate(conn, old)
    assert await conn.fetchval(triggers, table) == oids
    versions = await conn.fetchval(
        f'SELECT array_agg(version ORDER BY version) FROM "{old.schema}".schema_version'
    )
    assert versions == [m.version for m in migrations()]


async def test_migrate_dry_run_prints_the_sql_and_changes_nothing(pg_dsn: str, schema: str, conn):
    result = await anyio.run_process(
        [
            sys.executable,
            "-m",
            "worker",
            "migrate",
            "--dry-run",
            "--dsn",
            pg_dsn,
            "--schema",
            schema,
        ],
        check=False,
        env=worker_env(),
        cwd=REPO,
    )
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert f'CREATE TABLE IF NOT EXISTS "{schema}".intent' in out
    assert (
        "-- migration 0001_initial" in out and "-- migration 0002_enqueue_security_definer" in out
    )
    assert not await schema_exists(conn, Names(schema, default_channel(schema)))
