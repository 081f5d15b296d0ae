"""Claims while vacuum cannot run (issue 21), at a small scale and against a real PostgreSQL:
the claim starts at a floor below which nothing was pending, a row that commits below it is
still found (by the full scan once a poll), and the health read names what holds the horizon.
Behaviour only: nothing here asserts on durations."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import partial

import anyio
import asyncpg

from tests.conftest import Recorder, count_by_status, wait_until
from tests.test_dashboard import _health, idle_snapshot
from worker.dashboard.lines import horizon_holder
from worker.observe.findings import assess
from worker.producer import enqueue
from worker.store.db import create_pool, init_connection
from worker.store.queries import FULL_SCAN, Store
from worker.store.sqlfiles import Names

CLAIM = {"worker_id": "w1", "lease": 30.0, "skip_kinds": [], "default_max_attempts": 5}
HOLDER_APP = "xmin test holder"


async def test_a_claim_from_a_floor_skips_below_it_and_a_full_scan_does_not(
    db: asyncpg.Connection, names: Names
) -> None:
    await init_connection(db)
    store = Store(names)
    first = await enqueue(db, "k", {"n": 1}, schema=names.schema)
    second = await enqueue(db, "k", {"n": 2}, schema=names.schema)
    # margin 0: the floor is the first row left pending (no room for late commits).
    [got], floor = await store.claim_from(db, FULL_SCAN, limit=1, margin=0.0, **CLAIM)
    assert got.id == first
    assert floor is not None and floor.id == second
    # A row that lands below the floor: a run_at in the past (as a long transaction's is).
    late = await enqueue(
        db, "k", {"n": 3}, run_at=datetime.now(UTC) - timedelta(hours=1), schema=names.schema
    )
    intents, _ = await store.claim_from(db, floor, limit=10, margin=0.0, **CLAIM)
    assert [i.id for i in intents] == [second]
    assert await store.next_due(db, floor) is None  # nothing pending past the floor
    assert [i.id for i in await store.claim(db, limit=10, **CLAIM)] == [late]


async def test_claims_find_every_row_while_a_snapshot_holds_the_horizon(
    pg_dsn: str, db: asyncpg.Connection, names: Names, start_relay
) -> None:
    holder = await asyncpg.connect(pg_dsn, server_settings={"application_name": HOLDER_APP})
    producer = await asyncpg.connect(pg_dsn)
    rec = Recorder()
    try:
        held = holder.transaction(isolation="repeatable_read")
        await held.start()
        await holder.fetchval(f'SELECT count(*) FROM "{names.schema}".intent')  # the snapshot
        async with start_relay({"k": rec}):
            # A producer transaction that stays open while others commit past it: its row
            # carries the transaction's start as run_at, below where the claims have got to.
            slow = producer.transaction()
            await slow.start()
            late = await enqueue(producer, "k", {"late": True}, schema=names.schema)
            ids: list[int] = []
            for wave in range(6):
                batch = [await enqueue(db, "k", {"w": wave}, schema=names.schema) for _ in "x" * 20]
                ids += batch
                await wait_until(partial(_delivered, rec, batch))
                await anyio.sleep(0.3)  # the floor's margin (1 s) passes over the slow row
            await slow.commit()
            await wait_until(lambda: rec.calls[late] == 1)
            assert all(rec.calls[i] == 1 for i in ids)
            await wait_until(lambda: _all_sent(db, names, len(ids) + 1))
            # The horizon was held all along: the claimed rows' old versions are still there.
            pid = await holder.fetchval("SELECT pg_backend_pid()")
            xmin = "SELECT backend_xmin IS NOT NULL FROM pg_stat_activity WHERE pid = $1"
            assert await db.fetchval(xmin, pid)
            pool = await create_pool(pg_dsn, max_size=1, application_name="xmin test")
            try:
                health = await Store(names).db_health(pool, cap=1000, timeout=10.0)
            finally:
                await pool.close()
        await held.rollback()
    finally:
        await producer.close()
        await holder.close()
    # Another session of a shared server may hold it further back; else it is ours, named.
    assert health.horizon_kind is not None and health.horizon_xids is not None
    if health.oldest_xact_pid == pid:
        assert health.oldest_xact_application == HOLDER_APP
        assert health.horizon_state == "idle in transaction"
        assert health.horizon_kind == "transaction"
    assert health.index_bytes and health.index_bytes > 0


def _delivered(rec: Recorder, ids: list[int]) -> bool:
    return all(rec.calls[i] for i in ids)


async def _all_sent(db: asyncpg.Connection, names: Names, n: int) -> bool:
    return await count_by_status(db, names) == {"sent": n}


def test_the_dashboard_and_findings_name_what_holds_the_horizon() -> None:
    session = _health(
        oldest_xact_seconds=1800.0,
        oldest_xact_pid=4242,
        oldest_xact_application="psql",
        horizon_kind="transaction",
        horizon_state="idle in transaction",
        horizon_xids=5000,
    )
    assert horizon_holder(session) == "xact by pid 4242 (psql, idle in transaction)"
    slot = _health(
        oldest_xact_pid=None,
        oldest_xact_application="standby_1",
        horizon_kind="replication slot",
        horizon_state="inactive",
        horizon_xids=2_000_000,
    )
    assert horizon_holder(slot) == "replication slot standby_1 (inactive)"
    snap = idle_snapshot()
    said = [f.text for f in assess(replace(snap, db=slot))]
    assert "slot standby_1 holds xmin" in said
    assert horizon_holder(_health()) == ""
