"""Least privilege: a worker and a producer, each a non-superuser role with exactly what
`outbox-worker grants` prints, do all their work; a producer can do nothing else."""

from __future__ import annotations

import signal
import sys
from collections.abc import AsyncIterator

import anyio
import asyncpg
import pytest

from tests.conftest import wait_until
from tests.fault.workers import REPO, WorkerProcess, run_args, worker_env
from tests.roles import Role, login_roles
from worker.producer import enqueue


async def cli(*args: str) -> tuple[int, str]:
    result = await anyio.run_process(
        [sys.executable, "-m", "worker", *args], check=False, env=worker_env(), cwd=REPO
    )
    return result.returncode, (result.stdout + result.stderr).decode(errors="replace")


@pytest.fixture
async def granted(
    pg_dsn: str, db: asyncpg.Connection, schema: str
) -> AsyncIterator[tuple[Role, Role]]:
    """A worker role and a producer role, given exactly the printed grants."""
    async with login_roles(db, pg_dsn, "worker", "producer") as (worker, producer):
        code, sql = await cli(
            "grants", "--worker-role", worker.name, "--producer-role", producer.name,
            "--schema", schema,
        )  # fmt: skip
        assert code == 0, sql
        await db.execute(sql)
        yield worker, producer


async def test_grants_are_quoted_and_never_give_producers_update_or_delete():
    code, sql = await cli("grants", "--worker-role", 'w"1', "--producer-role", "P", "--schema", "S")
    assert code == 0, sql
    assert 'GRANT USAGE ON SCHEMA "S" TO "w""1";' in sql
    producer = [ln for ln in sql.splitlines() if ln.endswith('TO "P";')]
    assert producer and not any("UPDATE" in ln or "DELETE" in ln for ln in producer)
    columns = "kind, payload, run_at, dedupe_key, max_attempts, ordering_key, trace_context"
    assert f'GRANT INSERT ({columns}) ON "S".intent TO "P";' in sql


async def test_a_producer_enqueues_and_inserts_but_touches_nothing_else(granted, db, schema):
    _, producer = granted
    conn = await asyncpg.connect(producer.dsn)
    try:
        first = await enqueue(conn, "noop", {"n": 1}, dedupe_key="d", schema=schema)
        assert await enqueue(conn, "noop", {"n": 2}, dedupe_key="d", schema=schema) == first
        await conn.execute(
            f'INSERT INTO "{schema}".intent (kind, payload) VALUES ($1, $2)', "noop", "{}"
        )
        refused = [
            f"INSERT INTO \"{schema}\".intent (kind, payload, status, sent_at) "
            "VALUES ('x', '{}', 'sent', now())",
            f'UPDATE "{schema}".intent SET status = \'sent\'',
            f'DELETE FROM "{schema}".intent',
            f'SELECT payload FROM "{schema}".intent',
        ]  # fmt: skip
        for sql in refused:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(sql)
    finally:
        await conn.close()
    code, out = await cli("enqueue", "noop", "{}", "--dsn", producer.dsn, "--schema", schema)
    assert code == 0 and out.strip().isdigit(), out
    assert await db.fetchval(f'SELECT count(*) FROM "{schema}".intent') == 3


async def test_the_worker_runs_and_the_operator_commands_work_with_only_their_grants(
    granted, db, schema
):
    worker_role, producer = granted
    conn = await asyncpg.connect(producer.dsn)
    try:
        for n in range(3):
            await enqueue(conn, "noop", {"n": n}, ordering_key="k", schema=schema)
        await enqueue(conn, "noop", {}, schema=schema)
    finally:
        await conn.close()

    async def sent(n: int) -> bool:
        query = f"SELECT count(*) FROM \"{schema}\".intent WHERE status = 'sent'"
        return bool(await db.fetchval(query) == n)

    worker = WorkerProcess(run_args(dsn=worker_role.dsn, schema=schema))
    try:
        await worker.start()
        await worker.ready()
        await wait_until(lambda: sent(4), timeout=60)
        # Idle now (its flag in idle_worker): a new insert wakes it.
        await enqueue(db, "noop", {}, schema=schema)
        await wait_until(lambda: sent(5), timeout=60)
        worker.signal(signal.SIGTERM)
        assert await worker.wait(timeout=30) == 0, worker.tail()
    finally:
        await worker.aclose()
    assert "Traceback" not in worker.output and "permission denied" not in worker.output
    # A dead head halts key h: skip-dead, retry-dead and purge as the worker's role.
    await db.execute(
        f'INSERT INTO "{schema}".intent (kind, payload, status, last_error, ordering_key) '
        "VALUES ('noop', '{}', 'dead', 'boom', 'h'), ('noop', '{}', 'dead', 'boom', 'h')"
    )
    on = ("--dsn", worker_role.dsn, "--schema", schema)
    for args, expected in [
        (("status", "--json"), '"halted_keys":1'),
        (("skip-dead", "h"), "moves on"),
        (("retry-dead", "--key", "h"), "2 dead intents back to pending"),
        (("purge", "--older-than", "1s"), "deleted"),
    ]:
        code, out = await cli(*args, *on)
        assert code == 0 and expected in out, (args, out)
