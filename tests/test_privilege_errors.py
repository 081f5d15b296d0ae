"""A role that lacks a privilege gets one line naming it and the fix, exit status 2: in
every command and at the start of `run`; a health read that is refused says so."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.fault.workers import WorkerProcess, run_args
from tests.roles import Role, login_roles
from tests.test_roles import cli
from worker.observe.findings import assess
from worker.observe.health import HealthMonitor
from worker.observe.stats import Stats
from worker.producer import enqueue
from worker.store.db import create_pool
from worker.store.grants import NO_PRIVILEGE, grants_sql
from worker.store.queries import Store
from worker.store.sqlfiles import Names


@pytest.fixture
async def worker_role(pg_dsn: str, db: asyncpg.Connection, schema: str) -> AsyncIterator[Role]:
    """A role with the worker's grants; each test takes one away."""
    async with login_roles(db, pg_dsn, "worker") as [role]:
        await db.execute(grants_sql(schema, role.name, None))
        yield role


def only_error(code: int, output: str) -> str:
    assert code == 2, output
    assert "Traceback" not in output, output
    errors = [ln for ln in output.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1, output
    assert "outbox-worker grants --" in errors[0], output
    return errors[0]


COMMANDS = [
    ("status",),
    ("retry-dead",),
    ("skip-dead", "k"),
    ("purge", "--older-than", "1d"),
    ("enqueue", "noop", "{}"),
    ("run", "--handlers", "tests.sample_handlers:handlers", "--log-format", "json"),
]


async def test_without_usage_on_the_schema_every_command_says_so(worker_role, db, schema):
    await db.execute(f'REVOKE USAGE ON SCHEMA "{schema}" FROM "{worker_role.name}"')
    for command in COMMANDS:
        code, output = await cli(*command, "--dsn", worker_role.dsn, "--schema", schema)
        line = only_error(code, output)
        assert f'USAGE on SCHEMA "{schema}"' in line, (command, line)


async def test_without_select_on_halted_key_status_and_run_say_so(worker_role, db, schema):
    await db.execute(f'REVOKE SELECT ON "{schema}".halted_key FROM "{worker_role.name}"')
    for command in (COMMANDS[0], COMMANDS[-1]):
        code, output = await cli(*command, "--dsn", worker_role.dsn, "--schema", schema)
        line = only_error(code, output)
        assert f'SELECT on "{schema}".halted_key' in line, (command, line)


async def test_migrate_by_a_role_that_does_not_own_the_schema_is_one_line(worker_role, db, schema):
    # A migration to apply (an up-to-date schema needs nothing, from anyone).
    await db.execute(f'DELETE FROM "{schema}".schema_version WHERE version = 2')
    await db.execute(f'GRANT SELECT ON "{schema}".schema_version TO "{worker_role.name}"')
    code, output = await cli("migrate", "--dsn", worker_role.dsn, "--schema", schema)
    assert code == 2 and "Traceback" not in output, output
    [line] = output.strip().splitlines()
    assert "migrate: permission denied" in line and "owns schema" in line, line


async def test_a_refused_health_read_is_not_an_unreachable_database(
    worker_role, db, schema, names: Names
):
    await db.execute(f'REVOKE SELECT ON "{schema}".halted_key FROM "{worker_role.name}"')
    pool = await create_pool(worker_role.dsn, max_size=1, application_name="test")
    try:
        stats = Stats(concurrency=1)
        await HealthMonitor(pool, Store(names), stats).refresh()
    finally:
        await pool.close()
    snap = stats.snapshot(listen=True, stopping=False)
    assert snap.db_error is not None and snap.db_error.startswith(NO_PRIVILEGE), snap.db_error
    assert "halted_key" in snap.db_error and "outbox-worker grants" in snap.db_error
    texts = [f.text for f in assess(snap)]
    assert "database unreachable" not in texts and any("privilege" in t for t in texts), texts


async def test_a_grant_revoked_while_the_worker_runs_ends_it_in_one_line(worker_role, db, schema):
    worker = WorkerProcess(run_args(dsn=worker_role.dsn, schema=schema))
    try:
        await worker.start()
        await worker.ready()
        await db.execute(f'REVOKE UPDATE ON "{schema}".intent FROM "{worker_role.name}"')
        await enqueue(db, "noop", {}, schema=schema)  # its claim is refused
        assert await worker.wait(timeout=60) == 2, worker.tail()
    finally:
        await worker.aclose()
    assert "Traceback" not in worker.output, worker.tail()
    [line] = [ln.text for ln in worker.lines if "permission denied" in ln.text]
    assert "outbox-worker grants --worker-role" in line, line
