"""The typed store against a real PostgreSQL: a claimed row's life through its methods, and
the SQL it renders (one definition of "blocks its key", one idle-flag lock key)."""

from __future__ import annotations

from functools import partial

import asyncpg

from worker.intent import Intent
from worker.outcome import Released, Sent
from worker.store.db import init_connection
from worker.store.queries import Store
from worker.store.sqlfiles import Names, load_queries, migration_sql

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_every_placeholder_is_rendered_and_the_key_condition_is_one():
    names = Names("s", "c")
    queries = load_queries(names)
    schema = migration_sql(names)
    assert all("{{" not in sql for sql in [*queries.values(), schema])
    blocks = (
        "(b.status IN ('pending', 'processing') OR (b.status = 'dead' AND NOT b.ordering_skipped))"
    )
    assert blocks in queries["claim"] and blocks in queries["hold_backlog"]
    # The index the claim probes has the same predicate, on the row itself.
    assert blocks.replace("b.", "") in schema
    lock = "5236, hashtext('c')"
    assert f"pg_advisory_xact_lock({lock})" in queries["declare_idle"]
    assert f"pg_try_advisory_xact_lock_shared({lock})" in schema


async def test_a_row_through_the_store_claim_heartbeat_record_rescue(
    db: asyncpg.Connection, names: Names
) -> None:
    await init_connection(db)  # the worker's JSON codecs
    store = Store(names)
    enqueue = partial(store.enqueue, db, kind="k", run_at=None, dedupe_key=None)
    first = await enqueue(
        payload_json='{"n": 1}', max_attempts=None, ordering_key="key-1", trace_context_json=None
    )
    traced = f'{{"traceparent": "{TRACEPARENT}"}}'
    second = await enqueue(
        payload_json='{"n": 2}', max_attempts=3, ordering_key=None, trace_context_json=traced
    )
    claim = {"lease": 30.0, "limit": 10, "skip_kinds": [], "default_max_attempts": 7}
    intents = await store.claim(db, worker_id="w1", **claim)
    by_id: dict[int, Intent] = {i.id: i for i in intents}
    assert set(by_id) == {first, second}
    assert by_id[first].payload == {"n": 1} and by_id[first].ordering_key == "key-1"
    assert (by_id[first].attempts, by_id[first].max_attempts) == (1, 7)
    assert by_id[second].max_attempts == 3
    assert by_id[second].trace_context == {"traceparent": TRACEPARENT}
    assert await store.claim(db, worker_id="w2", **claim) == []

    # Not ours: nothing renewed for w2, both named gone; ours: renewed, none gone.
    assert await store.heartbeat(db, "w2", [first, second], 30.0) == {first, second}
    assert await store.heartbeat(db, "w1", [first, second], 30.0) == set()
    # A fenced write: w2 records nothing; w1 records both.
    batch = [(by_id[first], Sent()), (by_id[second], Released(0.0))]
    assert await store.record_outcomes(db, "w2", batch, skip_dead=False) == set()
    assert await store.record_outcomes(db, "w1", batch, skip_dead=False) == {first, second}
    rows = {
        r["id"]: (r["status"], r["attempts"])
        for r in await db.fetch(f'SELECT id, status, attempts FROM "{names.schema}".intent')
    }
    assert rows == {first: ("sent", 1), second: ("pending", 0)}  # released: attempt refunded
    # Recorded meanwhile: gone for the heartbeat too, and never renewed.
    assert await store.heartbeat(db, "w1", [first], 30.0) == {first}

    # An expired lease is rescued (an attempt), unless the caller still holds the row.
    [again] = await store.claim(db, worker_id="w1", **{**claim, "lease": 0.0})
    assert await store.rescue_expired(db, max_attempts=7, keep=[again.id], skip_dead=False) == []
    assert await store.rescue_expired(db, max_attempts=7, keep=[], skip_dead=False) == ["pending"]
    assert await store.next_due(db) is not None
