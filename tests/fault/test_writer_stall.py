"""The outcome writers stall (a lock the test holds on one row each worker is delivering)
for three leases, with two worker processes, thousands of intents and a short lease.

Invariant: no intent is delivered twice (the rows whose outcome waits in a stuck writer are
still heartbeated, so no worker rescues them); each worker stops claiming at its bound on
rows held (2 x --concurrency) and says so once; nothing is claimed while both are stuck;
when the lock goes, both resume by themselves and every intent ends ``sent``.
"""

from __future__ import annotations

import anyio
import asyncpg

from tests.conftest import wait_until
from tests.fault.ledger import Outbox, check_ledger, delivered
from tests.smtp_server import Script, Step

LEASE = 3.0  # heartbeat every second: margin for a loaded machine
CONCURRENCY = 8
BOUND = 2 * CONCURRENCY  # worker.relay.inflight.held_bound
N = 3000


async def test_stalled_outcome_writers_pause_claims_and_deliver_nothing_twice(
    outbox: Outbox, smtp, spawn, pg_dsn: str
) -> None:
    # The first deliveries take a second: both workers are surely delivering when the test
    # picks a row of each to lock.
    smtp.script(*[Script(data=Step(delay=1.0))] * (2 * CONCURRENCY))
    workers = [await spawn(smtp_url=smtp.url(), concurrency=CONCURRENCY, lease=LEASE)]
    workers.append(await spawn(smtp_url=smtp.url(), concurrency=CONCURRENCY, lease=LEASE))
    ids = {await w.ready(): w for w in workers}
    committed = await outbox.enqueue_emails(N)

    locker = await asyncpg.connect(pg_dsn)
    try:
        lock = locker.transaction()
        await lock.start()
        locked = await _lock_one_row_of_each(locker, outbox.table, set(ids))
        # Each row's outcome write now waits for the lock; so does every later outcome of
        # its worker. Both must stop claiming at the bound and say so.
        for worker in workers:
            await worker.wait_for_log("claims paused", timeout=60)
        pending = (await outbox.counts())["pending"]
        # Three leases: long enough for any lease the heartbeat let lapse to be rescued.
        for _ in range(int(3 * LEASE / 0.25)):
            held = await _held(outbox)
            assert set(held) <= set(ids) and max(held.values(), default=0) <= BOUND, held
            await anyio.sleep(0.25)
        assert (await outbox.counts())["pending"] == pending  # no claim while stuck
        assert pending > 0
        await lock.rollback()
    finally:
        await locker.close()

    for worker in workers:
        await worker.wait_for_log("claims resumed", timeout=60)
    await outbox.wait_settled(timeout=120)
    report = await check_ledger(outbox, delivered(smtp), committed=committed)
    print(f"\nwriters stuck on {sorted(locked)} for {3 * LEASE:g}s: {report.line()}")
    assert report.counts == {"sent": N} and report.duplicates == 0
    for worker in workers:
        assert len(worker.logged("claims paused")) == 1, worker.tail()
        assert len(worker.logged("claims resumed")) == 1, worker.tail()
        for sign in ("lost the lease", "lease lost", "rescued"):
            assert not worker.logged(sign), worker.tail()


async def _lock_one_row_of_each(
    conn: asyncpg.Connection, table: str, worker_ids: set[str]
) -> list[int]:
    """In the caller's transaction: one row each worker is delivering, locked. Re-checked
    under the lock (READ COMMITTED): still ``processing`` and its worker's, so its outcome
    is yet to be written."""
    locked: dict[str, int] = {}

    async def lock_more() -> bool:
        for worker_id in worker_ids - set(locked):
            row = await conn.fetchval(
                f"SELECT id FROM {table} WHERE status = 'processing' AND locked_by = $1 "
                "ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED",
                worker_id,
            )
            if row is not None:
                locked[worker_id] = row
        return len(locked) == len(worker_ids)

    await wait_until(lock_more, timeout=60, interval=0.01)
    return list(locked.values())


async def _held(outbox: Outbox) -> dict[str, int]:
    rows = await outbox.conn.fetch(
        f"SELECT locked_by, count(*) AS n FROM {outbox.table} "
        "WHERE status = 'processing' GROUP BY locked_by"
    )
    return {r["locked_by"]: r["n"] for r in rows}
