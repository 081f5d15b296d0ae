"""Retention across two real worker processes: one deleter at a time.

Proved by the database, not by timing: a statement-level trigger (the test's own) records,
for every DELETE of the intent table, the backend that ran it and which backends held the
retention lock then. Every DELETE that removed rows ran while its own backend, and no other,
held the lock. And while the test itself holds the lock, both workers skip their rounds
(they say so) and delete nothing. Directly, and through PgBouncer in transaction mode.
"""

from __future__ import annotations

from collections.abc import Iterator

import asyncpg
import pytest

from tests.conftest import wait_until
from tests.pgbouncer import pgbouncer
from worker.store.sqlfiles import RETENTION_LOCK_CLASS

ROWS = 5000  # three windows of 2,000


@pytest.fixture(params=["direct", "pgbouncer"])
def worker_dsn(request: pytest.FixtureRequest, pg_dsn: str) -> Iterator[str]:
    """The workers' DSN: the database itself, or PgBouncer in transaction mode in front of it
    (each statement on whichever server connection: a session lock would not work there)."""
    if request.param == "direct":
        yield pg_dsn
        return
    with pgbouncer(pg_dsn) as bouncer:
        yield bouncer.dsn(pg_dsn)


async def test_two_workers_delete_one_at_a_time(db, pg_dsn, worker_dsn, schema, spawn):
    table = f'"{schema}".intent'
    await db.execute(
        f"""
        CREATE TABLE "{schema}".deleter_log (pid int, n bigint, holders int[]);
        CREATE FUNCTION "{schema}".log_deleter() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO "{schema}".deleter_log
            SELECT pg_backend_pid(), (SELECT count(*) FROM gone),
                   ARRAY(SELECT pid FROM pg_locks
                         WHERE locktype = 'advisory' AND granted AND objsubid = 2
                           AND classid = {RETENTION_LOCK_CLASS}
                           AND objid = hashtext('{schema}')::oid);
            RETURN NULL;
        END $$;
        CREATE TRIGGER log_deleter AFTER DELETE ON {table}
            REFERENCING OLD TABLE AS gone FOR EACH STATEMENT
            EXECUTE FUNCTION "{schema}".log_deleter();
        """
    )
    await db.execute(
        f"INSERT INTO {table} (kind, payload, status, created_at, sent_at)"
        " SELECT 'email', '{}', 'sent', now() - interval '1 hour', now() - interval '1 hour'"
        f" FROM generate_series(1, {ROWS})"
    )
    holder = await asyncpg.connect(pg_dsn)  # the test plays a third deleter, mid-batch
    try:
        lock = holder.transaction()
        await lock.start()
        await holder.execute(
            "SELECT pg_advisory_xact_lock($1, hashtext($2))", RETENTION_LOCK_CLASS, schema
        )
        extra = ["-v", "--retain-sent", "2s", "--retain-dead", "2s"]
        workers = [await spawn(dsn=worker_dsn, extra=extra) for _ in range(2)]
        for worker in workers:
            await worker.ready()
        for worker in workers:
            await worker.wait_for_log("another worker is deleting; skipped this round")
        assert await db.fetchval(f"SELECT count(*) FROM {table}") == ROWS
        await lock.commit()
    finally:
        await holder.close()

    async def emptied() -> bool:
        return await db.fetchval(f"SELECT count(*) FROM {table}") == 0

    await wait_until(emptied, timeout=60)
    log = await db.fetch(f'SELECT pid, n, holders FROM "{schema}".deleter_log WHERE n > 0')
    assert sum(r["n"] for r in log) == ROWS
    for r in log:
        assert r["holders"] == [r["pid"]], log

    def said() -> int:  # one line per round that deleted, not one per window
        lines = [line.msg for w in workers for line in w.logged("retention: deleted")]
        return sum(int(msg.split()[2]) for msg in lines)

    await wait_until(lambda: said() == ROWS, timeout=30)
    for worker in workers:
        assert worker.running, worker.tail()
