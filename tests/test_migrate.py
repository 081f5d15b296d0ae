"""Schema migration: idempotent, safe when run concurrently, shipped inside the wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import anyio
import asyncpg
import pytest

from worker.errors import ConfigError
from worker.store.migrate import ensure_schema, migrate, schema_exists
from worker.store.sqlfiles import Names, migrations

REPO = Path(__file__).resolve().parent.parent


async def test_migrate_twice_and_concurrently(pg_dsn: str, names: Names):
    conns = [await asyncpg.connect(pg_dsn) for _ in range(4)]
    try:
        assert not await schema_exists(conns[0], names)
        created: list[bool] = []

        async def migrate_one(conn: asyncpg.Connection) -> None:
            created.append((await migrate(conn, names)).created)

        async with anyio.create_task_group() as tg:  # four workers starting at once
            for conn in conns:
                tg.start_soon(migrate_one, conn)
        assert sorted(created) == [False, False, False, True]  # exactly one created it
        # And once more, on an up-to-date schema:
        assert str(await migrate(conns[0], names)) == "is up to date"
        assert await schema_exists(conns[0], names)
        triggers = await conns[0].fetchval(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass($1) AND NOT tgisinternal",
            f'"{names.schema}".intent',
        )
        assert triggers >= 1
    finally:
        for conn in conns:
            await conn.close()


def test_migrations_are_numbered_from_one_without_a_gap():
    found = migrations()
    assert [m.version for m in found] == list(range(1, len(found) + 1)) and len(found) > 1
    assert found[0].name == "initial"


def test_wheel_carries_the_sql(tmp_path: Path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("pg_outbox_relay-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for migration in (REPO / "worker" / "store" / "migrations").glob("*.sql"):
        assert f"worker/store/migrations/{migration.name}" in names
    assert "worker/store/sql/relay.sql" in names


# The intent table and enqueue() as the first release created them (before ordering keys).
_BEFORE_ORDERING_KEYS = """
CREATE SCHEMA {s};
CREATE TABLE {s}.intent (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, kind text NOT NULL, payload jsonb NOT NULL,
    status text NOT NULL DEFAULT 'pending', attempts integer NOT NULL DEFAULT 0,
    max_attempts integer, run_at timestamptz NOT NULL DEFAULT now(), locked_by text,
    locked_until timestamptz, last_error text, created_at timestamptz NOT NULL DEFAULT now(),
    sent_at timestamptz, dedupe_key text);
CREATE INDEX intent_pending_run_at ON {s}.intent (run_at, id) WHERE status = 'pending';
CREATE FUNCTION {s}.enqueue(kind text, payload jsonb, run_at timestamptz DEFAULT NULL,
    dedupe_key text DEFAULT NULL, max_attempts integer DEFAULT NULL) RETURNS bigint
LANGUAGE sql AS $$ INSERT INTO {s}.intent (kind, payload) VALUES (kind, payload) RETURNING id $$;
INSERT INTO {s}.intent (kind, payload) VALUES ('email', '{{}}');
"""


async def test_migrate_upgrades_a_table_from_before_ordering_keys(pg_dsn: str, names: Names):
    conn = await asyncpg.connect(pg_dsn)
    s = f'"{names.schema}"'
    try:
        await conn.execute(_BEFORE_ORDERING_KEYS.format(s=s))
        await migrate(conn, names)
        row = await conn.fetchrow(
            f"SELECT ordering_key, ordering_skipped, ordering_held, trace_context FROM {s}.intent"
        )
        assert tuple(row) == (None, False, False, None)
        indexes = {
            r["indexname"]
            for r in await conn.fetch(
                "SELECT indexname FROM pg_indexes WHERE schemaname = $1", names.schema
            )
        }
        assert "intent_pending_run_at" not in indexes
        assert {"intent_pending_free", "intent_ordering_in_flight"} <= indexes
        # Both call forms work: positional as before, and the new named argument.
        await conn.fetchval(f"SELECT {s}.enqueue('email', '{{}}')")
        keyed = await conn.fetchval(f"SELECT {s}.enqueue('email', '{{}}', ordering_key => 'k')")
        assert (
            await conn.fetchval(f"SELECT ordering_key FROM {s}.intent WHERE id = $1", keyed) == "k"
        )
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(f"SELECT {s}.enqueue('email', '{{}}', ordering_key => '')")
        # Trace context: the new argument, and its check (added NOT VALID) holds new rows.
        context = '{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}'
        traced = await conn.fetchval(
            f"SELECT {s}.enqueue('email', '{{}}', trace_context => $1::jsonb)", context
        )
        stored = await conn.fetchval(f"SELECT trace_context FROM {s}.intent WHERE id = $1", traced)
        assert stored == context
        with pytest.raises(asyncpg.CheckViolationError, match="intent_trace_context_valid"):
            await conn.execute(f"SELECT {s}.enqueue('email', '{{}}', trace_context => '{{}}')")
        await migrate(conn, names)  # the constraint is there already: still idempotent
    finally:
        await conn.execute(f"DROP SCHEMA IF EXISTS {s} CASCADE")
        await conn.close()


async def test_a_worker_without_migrate_refuses_an_older_table_in_one_line(
    db: asyncpg.Connection, names: Names
) -> None:
    await ensure_schema(db, names, apply=False)  # migrated by the fixture: current
    # The schema as a worker from before the last migration left it; the rolling upgrade's
    # new worker starts before anyone ran migrate.
    last = migrations()[-1]
    await db.execute(f'DELETE FROM "{names.schema}".schema_version WHERE version = {last.version}')
    with pytest.raises(ConfigError, match=r"is older than this worker .*: run `outbox-worker"):
        await ensure_schema(db, names, apply=False)
    await migrate(db, names)  # `outbox-worker migrate` applies what is missing
    await ensure_schema(db, names, apply=False)


async def test_a_second_migration_takes_no_lock_on_the_intent_table(
    db: asyncpg.Connection, names: Names
) -> None:
    """Producers must not queue behind a re-run of the migration (--migrate at every start):
    a re-run of the same SQL takes no lock on the table at all."""
    async with db.transaction():
        await ensure_schema(db, names, apply=True)
        locks = await db.fetch(
            "SELECT mode FROM pg_locks WHERE pid = pg_backend_pid() AND relation = $1::regclass",
            f'"{names.schema}".intent',
        )
    assert locks == []
    # A migration not applied yet is applied, and recorded.
    last = migrations()[-1]
    await db.execute(f'DELETE FROM "{names.schema}".schema_version WHERE version = {last.version}')
    await ensure_schema(db, names, apply=True)
    recorded = await db.fetchval(f'SELECT max(version) FROM "{names.schema}".schema_version')
    assert recorded == last.version
