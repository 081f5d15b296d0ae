"""Backpressure against a stuck outcome writer, in-process (the relay's own state is read).

Invariant: while the outcome write cannot land (a lock held on one row), the worker holds
at most ``bound`` rows, claims nothing more, keeps the lease of every held row it can reach
(those whose outcome waits in its writer's queue included), says so once, and resumes by
itself when the lock goes; every intent is delivered once.
"""

from __future__ import annotations

import logging

import anyio
import asyncpg
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Recorder, count_by_status, wait_until
from worker.intent import Intent
from worker.observe.metrics import relay_registry
from worker.relay.inflight import held_bound
from worker.store.sqlfiles import Names

LEASE = 3.0  # the heartbeat renews every second: margin for a loaded machine


async def test_a_stuck_outcome_writer_pauses_claims_at_the_bound_and_keeps_leases(
    pg_dsn: str, db: asyncpg.Connection, names: Names, start_relay, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="outbox")
    table = f'"{names.schema}".intent'
    n = 60
    ids = [
        r["id"]
        for r in await db.fetch(
            f"INSERT INTO {table} (kind, payload) SELECT 'noop', '{{}}' "
            "FROM generate_series(1, $1) RETURNING id",
            n,
        )
    ]
    first = min(ids)
    started, go = anyio.Event(), anyio.Event()

    async def hold_first(intent: Intent) -> None:
        if intent.id == first:
            started.set()
            await go.wait()

    rec = Recorder(hold_first)
    locker = await asyncpg.connect(pg_dsn)
    try:
        async with start_relay({"noop": rec}, concurrency=2, lease=LEASE) as relay:
            bound = relay.inflight.bound
            assert bound == held_bound(2) == 4
            with anyio.fail_after(20):
                await started.wait()
            lock = locker.transaction()
            await lock.start()
            await locker.execute(f"SELECT 1 FROM {table} WHERE id = $1 FOR UPDATE", first)
            go.set()  # its outcome write now waits for our lock, and every later one too
            await wait_until(lambda: relay.stats.claims_paused_since is not None)

            held = await _held(db, table, relay.worker_id)
            assert len(held) == len(relay.in_flight) == bound
            claimed = relay.stats.claimed
            families = _metrics(relay)
            assert families["outbox_claims_paused"] == 1.0
            assert families["outbox_outcomes_unrecorded"] == bound
            assert families["outbox_claim_pauses"] == 1.0  # the _total sample
            # Wait past every lease the held rows had at the pause: without the heartbeat
            # of rows whose outcome waits, they would now be free for a rescue.
            until = await db.fetchval(
                f"SELECT max(locked_until) FROM {table} WHERE id = ANY($1)", held
            )
            await wait_until(lambda: _past(db, until), timeout=3 * LEASE)
            assert await _lapsed_and_rescuable(db, table, held) == []
            assert relay.stats.claimed == claimed  # no claim while paused
            assert await _held(db, table, relay.worker_id) == held

            await lock.rollback()
            await wait_until(lambda: relay.stats.sent["noop"] == n, timeout=30)
            assert relay.stats.claims_paused_since is None
    finally:
        await locker.close()
    assert await count_by_status(db, names) == {"sent": n}
    assert set(rec.calls.values()) == {1} and len(rec.calls) == n
    said = [r.getMessage() for r in caplog.records if "claims " in r.getMessage()]
    assert len(said) == 2, said
    assert said[0].startswith(f"claims paused: {bound} outcomes wait to be recorded")
    assert said[1].startswith("claims resumed after")
    assert relay.stats.lease_lost == relay.stats.lease_rescues == 0


async def _held(db: asyncpg.Connection, table: str, worker_id: str) -> list[int]:
    rows = await db.fetch(
        f"SELECT id FROM {table} WHERE status = 'processing' AND locked_by = $1 ORDER BY id",
        worker_id,
    )
    return [r["id"] for r in rows]


async def _past(db: asyncpg.Connection, moment: object) -> bool:
    return bool(await db.fetchval("SELECT now() > $1", moment))


async def _lapsed_and_rescuable(db: asyncpg.Connection, table: str, ids: list[int]) -> list[int]:
    """Held rows whose lease has run out and that a rescue could take (not locked: the
    rows locked by the stuck write, or by the test, are out of any rescue's reach)."""
    async with db.transaction():
        rows = await db.fetch(
            f"SELECT id FROM {table} WHERE id = ANY($1) AND locked_until < now() "
            "FOR UPDATE SKIP LOCKED",
            ids,
        )
        return [r["id"] for r in rows]  # the transaction's end unlocks them at once


def _metrics(relay) -> dict[str, float]:  # type: ignore[no-untyped-def]
    text = generate_latest(relay_registry(relay, ["noop"])).decode()
    return {
        f.name: f.samples[0].value
        for f in text_string_to_metric_families(text)
        if f.samples and not f.samples[0].labels
    }
