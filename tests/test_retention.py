"""Retention (worker/relay/retention.py) on a real PostgreSQL: each state past its own age,
never a live row, never a dead intent that halts its ordering key (unless told), windows
that stop at young rows, the lock that makes one deleter at a time, forever, and what
/metrics and the dashboard show."""

from __future__ import annotations

import math
from dataclasses import replace

import anyio
import asyncpg

from tests.conftest import wait_until
from worker.dashboard.lines import database_line
from worker.observe.metrics import RelayCollector
from worker.observe.stats import Stats
from worker.relay.retention import FULL_EVERY, Retention, round_interval
from worker.store.queries import Store
from worker.store.rows import DbHealth
from worker.store.sqlfiles import RETENTION_LOCK_CLASS, Names

HOUR, DAY = 3600.0, 86400.0


async def _row(
    db: asyncpg.Connection,
    names: Names,
    status: str,
    *,
    age: float,
    key: str | None = None,
    skipped: bool = False,
) -> int:
    """One intent in ``status``, created (and for sent: sent) ``age`` seconds ago."""
    held = status == "processing"
    return int(
        await db.fetchval(
            f'INSERT INTO "{names.schema}".intent (kind, payload, status, created_at, sent_at,'
            " last_error, locked_by, locked_until, ordering_key, ordering_skipped, run_at)"
            " VALUES ('email', '{}', $1, now() - make_interval(secs => $2),"
            " CASE WHEN $1 = 'sent' THEN now() - make_interval(secs => $2) END,"
            " CASE WHEN $1 = 'dead' THEN 'refused' END,"
            " CASE WHEN $3 THEN 'w' END, CASE WHEN $3 THEN now() + interval '1 hour' END,"
            " $4, $5, now() + interval '1 day') RETURNING id",
            status,
            age,
            held,
            key,
            skipped,
        )
    )


async def _ids(db: asyncpg.Connection, names: Names) -> set[int]:
    return {r["id"] for r in await db.fetch(f'SELECT id FROM "{names.schema}".intent')}


def _retention(db: asyncpg.Connection, names: Names, **kw: object) -> tuple[Retention, Stats]:
    stats = Stats(1)
    args: dict = {"retain_sent": HOUR, "retain_dead": 7 * DAY, "keep_halting": True, **kw}
    return Retention(db, Store(names), stats, **args), stats


async def test_each_state_goes_after_its_own_age_and_live_rows_never(db, names):
    old_sent = await _row(db, names, "sent", age=2 * HOUR)
    young_sent = await _row(db, names, "sent", age=60)
    old_dead = await _row(db, names, "dead", age=8 * DAY)
    young_dead = await _row(db, names, "dead", age=2 * HOUR)  # past the sent age, not dead's
    live = {
        await _row(db, names, "pending", age=30 * DAY),
        await _row(db, names, "processing", age=30 * DAY),
    }
    # A dead head halts key K (its later intents wait); a skipped dead one halts nothing.
    halting = await _row(db, names, "dead", age=30 * DAY, key="K")
    behind = await _row(db, names, "pending", age=30 * DAY, key="K")
    skipped = await _row(db, names, "dead", age=30 * DAY, key="L", skipped=True)
    retention, stats = _retention(db, names)

    assert await retention.round() is True

    assert await _ids(db, names) == {young_sent, young_dead, halting, behind, *live}
    assert old_sent not in await _ids(db, names) and old_dead != skipped
    assert stats.retention_deleted == {"sent": 1, "dead": 2}
    assert stats.retention_last_run is not None
    oldest = stats.retention_oldest
    assert 55 < (oldest["sent"] or 0) < HOUR and (oldest["dead"] or 0) > 29 * DAY
    assert await db.fetchval(f'SELECT count(*) FROM "{names.schema}".halted_key') == 1


async def test_with_ordering_on_dead_continue_a_halting_head_goes_too(db, names):
    halting = await _row(db, names, "dead", age=30 * DAY, key="K")
    behind = await _row(db, names, "pending", age=1, key="K")
    retention, stats = _retention(db, names, keep_halting=False)
    await retention.round()
    assert halting not in await _ids(db, names) and behind in await _ids(db, names)
    assert stats.retention_deleted["dead"] == 1
    assert await db.fetchval(f'SELECT count(*) FROM "{names.schema}".halted_key') == 0


async def test_a_round_walks_windows_past_kept_rows_and_stops_at_young_ones(db, names):
    kept = {await _row(db, names, "dead", age=2 * DAY) for _ in range(25)}  # within 7 d
    for _ in range(35):
        await _row(db, names, "sent", age=3 * HOUR)
    young = {await _row(db, names, "sent", age=10) for _ in range(30)}
    retention, stats = _retention(db, names, batch=10, pause=0.0)
    assert await retention.round()
    assert await _ids(db, names) == kept | young
    assert stats.retention_deleted["sent"] == 35
    # Nothing left to delete: the round reads the kept prefix, then one young window.
    assert await retention.round()
    assert stats.retention_deleted["sent"] == 35


async def test_a_worker_that_finds_the_lock_taken_skips_its_round(db, pg_dsn, names):
    old = await _row(db, names, "sent", age=2 * HOUR)
    retention, stats = _retention(db, names)
    other = await asyncpg.connect(pg_dsn)  # another deleter, mid-batch
    try:
        async with other.transaction():
            await other.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext($2))", RETENTION_LOCK_CLASS, names.schema
            )
            assert await retention.round() is False
            assert old in await _ids(db, names)
            assert stats.retention_skipped == 1 and stats.retention_last_run is None
    finally:
        await other.close()
    assert await retention.round() is True  # committed: the lock went with the transaction
    assert old not in await _ids(db, names)


async def test_forever_keeps_every_row_and_runs_no_round(db, names):
    rows = {
        await _row(db, names, "sent", age=400 * DAY),
        await _row(db, names, "dead", age=400 * DAY),
    }
    retention, stats = _retention(db, names, retain_sent=math.inf, retain_dead=math.inf)
    assert not retention.enabled
    with anyio.fail_after(5):
        await retention.run()  # returns at once: no round, ever
    assert await _ids(db, names) == rows
    assert not stats.retention_enabled and stats.snapshot().retention is None
    # One state forever, the other not: only that one goes.
    retention, _ = _retention(db, names, retain_sent=math.inf, retain_dead=DAY)
    await retention.round()
    assert await db.fetchval(f'SELECT status FROM "{names.schema}".intent') == "sent"


def test_rounds_come_sooner_for_short_retentions():
    assert round_interval(DAY, 7 * DAY) == 30.0  # a row is gone within about a minute
    assert round_interval(4.0, math.inf) == 2.0
    assert round_interval(0.5, 0.5) == 1.0


async def test_the_relay_deletes_past_retention_and_shows_it(start_relay, db, names):
    """End to end: delivered intents go once past --retain-sent; /metrics and the dashboard."""
    delivered: list[int] = []

    async def handler(intent) -> None:
        delivered.append(intent.id)

    async with start_relay({"email": handler}, retain_sent=2.0, retain_dead=DAY) as relay:
        dead = await _row(db, names, "dead", age=2 * HOUR)  # kept: younger than a day
        for _ in range(20):
            await db.execute(f"SELECT \"{names.schema}\".enqueue('email', '{{}}'::jsonb)")
        await wait_until(lambda: len(delivered) == 20)
        await wait_until(lambda: relay.stats.retention_deleted["sent"] == 20, timeout=30)
        assert await _ids(db, names) == {dead}

        families = {f.name: f for f in RelayCollector(relay, ["email"]).collect()}
        deleted = {s.labels["status"]: s.value for s in families["outbox_retention_deleted"].samples
                   if s.name.endswith("_total")}  # fmt: skip
        assert deleted == {"sent": 20, "dead": 0}
        assert families["outbox_retention_last_run_timestamp_seconds"].samples[0].value > 0
        ages = {s.labels["status"]: s.value for s in
                families["outbox_retention_oldest_kept_age_seconds"].samples}  # fmt: skip
        assert set(ages) == {"dead"} and ages["dead"] > HOUR

        snap = replace(relay.stats.snapshot(), db=_health())
        line = " · ".join(part.plain for part in database_line(snap).parts)
        assert "retention 20 deleted, ran " in line


def _health() -> DbHealth:
    return DbHealth(0, 0, 0, 0, 1000, None, 0.0, 0, None, None, None, None, None, None, None)


async def test_rounds_start_at_the_floor_and_every_tenth_from_the_beginning(db, names):
    """Below the first row a round kept, everything was gone: the next rounds start there
    (no walk over deleted rows' index entries); a row that appears below it (a producer's
    transaction that committed late) goes at the next full round."""
    for _ in range(30):
        await _row(db, names, "sent", age=3 * HOUR)
    kept = await _row(db, names, "pending", age=10)
    retention, stats = _retention(db, names, batch=10, pause=0.0)
    await retention.round()
    assert await _ids(db, names) == {kept}
    late = await db.fetchval(
        f'INSERT INTO "{names.schema}".intent (id, kind, payload, status, created_at, sent_at)'
        " OVERRIDING SYSTEM VALUE VALUES (5, 'email', '{}', 'sent', now() - interval '3 hours',"
        " now() - interval '3 hours') RETURNING id"
    )
    for _ in range(FULL_EVERY - 1):
        await retention.round()
        assert late in await _ids(db, names)
    await retention.round()  # the tenth: from the beginning
    assert await _ids(db, names) == {kept}
    assert stats.retention_deleted["sent"] == 31
