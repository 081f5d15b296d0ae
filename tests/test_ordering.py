"""Ordering keys against a real PostgreSQL, relays in-process: one at a time per key, in id
order, through retries, rescues, dead heads and scheduled heads; other keys and unordered
intents flow past a halted key."""

from __future__ import annotations

import itertools
import random
import time
from collections import defaultdict

import anyio
import asyncpg

from tests.conftest import count_by_status, wait_until
from tests.docs_text import doc_snippet
from worker import PermanentError, TransientError
from worker.cli import admin
from worker.intent import Intent
from worker.producer import enqueue
from worker.store.sqlfiles import Names


class KeyedRecorder:
    """A handler that records each attempt (start, end, ok) and checks, across every relay
    of the test (one process), that no two attempts of one key ever overlap."""

    def __init__(self, *, fail_first: set[int] = frozenset(), seed: int = 1) -> None:
        self.attempts: dict[int, list[tuple[float, float, bool]]] = defaultdict(list)
        self.key_of: dict[int, str | None] = {}
        self.busy: set[str] = set()
        self.overlaps: list[tuple[str, int]] = []
        self.fail_first = fail_first
        self.dead: set[int] = set()  # fail permanently, once each
        self.rng = random.Random(seed)

    async def __call__(self, intent: Intent) -> None:
        key = intent.ordering_key
        self.key_of[intent.id] = key
        if key is not None:
            if key in self.busy:
                self.overlaps.append((key, intent.id))
            self.busy.add(key)
        start = time.monotonic()
        try:
            await anyio.sleep(self.rng.uniform(0, 0.003))
            if intent.id in self.dead:
                self.dead.discard(intent.id)
                raise PermanentError(f"intent {intent.id} refused")
            if intent.id in self.fail_first and intent.attempts == 1:
                raise TransientError("first attempt fails")
            self.attempts[intent.id].append((start, time.monotonic(), True))
        except BaseException:
            self.attempts[intent.id].append((start, time.monotonic(), False))
            raise
        finally:
            if key is not None:
                self.busy.discard(key)

    def first_success(self, intent_id: int) -> float:
        return min(end for _, end, ok in self.attempts[intent_id] if ok)

    def first_start(self, intent_id: int) -> float:
        return min(start for start, _, _ in self.attempts[intent_id])

    def check_order(self, ids_by_key: dict[str, list[int]]) -> None:
        """No attempt of intent n+1 of a key starts before intent n's successful end."""
        assert not self.overlaps, self.overlaps[:5]
        for key, ids in ids_by_key.items():
            for before, after in itertools.pairwise(ids):
                assert self.first_start(after) > self.first_success(before), (key, before, after)


async def enqueue_keyed(
    db: asyncpg.Connection, names: Names, keys: int, per_key: int, *, seed: int = 3
) -> dict[str, list[int]]:
    """Interleaved transactions, each with intents of several keys (ids follow the order)."""
    rng = random.Random(seed)
    todo = [f"k{k}" for k in range(keys) for _ in range(per_key)]
    rng.shuffle(todo)
    ids: dict[str, list[int]] = defaultdict(list)
    while todo:
        n = rng.randint(1, 8)
        batch, todo = todo[:n], todo[n:]
        async with db.transaction():
            for key in batch:
                ids[key].append(await _put(db, names, key))
    return ids


async def _put(db: asyncpg.Connection, names: Names, key: str | None, **kw) -> int:
    return await enqueue(db, "ordered", {"key": key}, ordering_key=key, schema=names.schema, **kw)


async def test_two_relays_deliver_each_key_in_order_through_retries(db, names, start_relay):
    ids = await enqueue_keyed(db, names, keys=40, per_key=8)
    assert {len(v) for v in ids.values()} == {8}
    unordered = [await _put(db, names, None) for _ in range(30)]
    all_ids = [i for key_ids in ids.values() for i in key_ids]
    rec = KeyedRecorder(fail_first=set(random.Random(7).sample(all_ids, 60)))
    async with (
        start_relay({"ordered": rec}, concurrency=16),
        start_relay({"ordered": rec}, concurrency=16),
    ):
        await wait_until(lambda: _all_sent(db, names, len(all_ids) + 30), timeout=60)
    rec.check_order(ids)
    assert all(rec.attempts[i] for i in unordered)
    assert sum(not ok for a in rec.attempts.values() for *_, ok in a) == 60


async def test_a_dead_head_halts_its_key_until_skipped(db, names, start_relay):
    head, *rest = [await _put(db, names, "order-1") for _ in range(4)]
    other = [await _put(db, names, "order-2") for _ in range(3)]
    free = await _put(db, names, None)
    rec = KeyedRecorder()
    rec.dead = {head}
    async with start_relay({"ordered": rec}):
        await wait_until(lambda: _statuses(db, names, [*other, free], {"sent"}))
        await wait_until(lambda: _statuses(db, names, [head], {"dead"}))
        report = await admin.status(db, names)
        assert report["ordering"]["halted_keys"] == 1
        assert report["ordering"]["held_intents"] == 3
        assert report["ordering"]["oldest_halted"]["key"] == "order-1"
        assert report["ordering"]["oldest_halted"]["dead_intent"] == head
        assert not any(rec.attempts[i] for i in rest)  # held, not even tried
        assert await _statuses(db, names, rest, {"pending"})

        assert await admin.skip_dead(db, names, "order-1") == head
        await wait_until(lambda: _statuses(db, names, rest, {"sent"}))
    assert await _statuses(db, names, [head], {"dead"})
    assert (await admin.status(db, names))["ordering"]["halted_keys"] == 0
    rec.check_order({"order-1": rest, "order-2": other})
    assert await admin.skip_dead(db, names, "order-1") is None  # nothing left to skip


async def test_retry_dead_runs_the_head_again_before_its_successors(db, names, start_relay):
    head, *rest = [await _put(db, names, "order-1") for _ in range(3)]
    rec = KeyedRecorder()
    rec.dead = {head}  # refused once; the second run succeeds
    async with start_relay({"ordered": rec}):
        await wait_until(lambda: _statuses(db, names, [head], {"dead"}))
        assert await admin.retry_dead(db, names, kind=None, intent_id=None, key="order-1") == [head]
        await wait_until(lambda: _statuses(db, names, [head, *rest], {"sent"}))
    rec.check_order({"order-1": [head, *rest]})


async def test_continue_on_dead_moves_the_key_on(db, names, start_relay):
    head, *rest = [await _put(db, names, "order-1") for _ in range(3)]
    rec = KeyedRecorder()
    rec.dead = {head}
    async with start_relay({"ordered": rec}, ordering_on_dead="continue"):
        await wait_until(lambda: _statuses(db, names, rest, {"sent"}))
    assert await _statuses(db, names, [head], {"dead"})
    assert (await admin.status(db, names))["ordering"]["halted_keys"] == 0
    assert rec.first_start(rest[0]) > max(end for _, end, _ in rec.attempts[head])


async def test_a_scheduled_head_holds_its_successors(db, names, start_relay):
    head = await enqueue(
        db,
        "ordered",
        {},
        ordering_key="k",
        schema=names.schema,
        run_at=await db.fetchval("SELECT now() + interval '1.5 seconds'"),
    )
    rest = [await _put(db, names, "k") for _ in range(3)]
    rec = KeyedRecorder()
    async with start_relay({"ordered": rec}):
        await wait_until(lambda: _statuses(db, names, [head, *rest], {"sent"}), timeout=30)
    rec.check_order({"k": [head, *rest]})


async def test_a_rescued_head_is_delivered_again_before_its_successors(db, names, start_relay):
    release = anyio.Event()
    started = anyio.Event()
    rec = KeyedRecorder()

    async def hangs_once(intent: Intent) -> None:
        if intent.attempts == 1 and intent.id == head:
            started.set()
            await release.wait()  # this worker has "hung" past its lease
        await rec(intent)

    head = await _put(db, names, "k")
    rest = [await _put(db, names, "k") for _ in range(3)]
    async with start_relay({"ordered": hangs_once}, lease=1.0, heartbeat=False):
        await started.wait()
        # A second relay rescues the expired lease; the head goes first, then the rest.
        async with start_relay({"ordered": rec}, lease=1.0):
            await wait_until(lambda: _statuses(db, names, [head, *rest], {"sent"}), timeout=30)
        release.set()
    rec.check_order({"k": [head, *rest]})
    assert (
        await db.fetchval(f'SELECT attempts FROM "{names.schema}".intent WHERE id = $1', head) == 2
    )


async def test_a_long_backlog_behind_a_retrying_head_is_kept_out_of_the_claim(
    db, names, start_relay
):
    # The head fails until the whole backlog is seen held (on a loaded machine the marking
    # passes may take longer than a fixed number of retries), and never runs out of attempts.
    head = await _put(db, names, "slow", max_attempts=10_000)
    await db.execute(
        f'INSERT INTO "{names.schema}".intent (kind, payload, ordering_key) '
        "SELECT 'ordered', '{}', 'slow' FROM generate_series(1, 3000)"
    )
    all_held = False
    rec = KeyedRecorder()

    async def flaky_head(intent: Intent) -> None:
        if intent.id == head and not all_held:
            raise TransientError("not yet")
        await rec(intent)

    async with start_relay({"ordered": flaky_head}, backoff_base=0.3, backoff_max=0.3):
        # While the head backs off, the claim loop marks the backlog held...
        await wait_until(
            lambda: db.fetchval(
                f'SELECT count(*) = 3000 FROM "{names.schema}".intent WHERE ordering_held'
            ),
            timeout=30,
        )
        all_held = True
        # ...and every release frees exactly the next one: all go, in order.
        await wait_until(lambda: _all_sent(db, names, 3001), timeout=120)
    ids = [r["id"] for r in await db.fetch(f'SELECT id FROM "{names.schema}".intent ORDER BY id')]
    rec.check_order({"slow": ids})
    assert not await db.fetchval(f'SELECT bool_or(ordering_held) FROM "{names.schema}".intent')


async def test_a_lower_id_committed_late_is_never_in_flight_beside_a_later_one(
    pg_dsn, db, names, start_relay
):
    """Order is the id order of *committed* rows: an id that commits after a later id of its
    key was delivered comes after it (docs/concepts/ordering.md). But never both in flight at
    once."""
    late = await asyncpg.connect(pg_dsn)
    try:
        tx = late.transaction()
        await tx.start()
        low = await _put(late, names, "k")  # not committed yet
        high = await _put(db, names, "k")
        release = anyio.Event()
        running: list[int] = []

        async def blocks(intent: Intent) -> None:
            running.append(intent.id)
            if intent.id == high:
                await release.wait()

        async with start_relay({"ordered": blocks}):
            await wait_until(lambda: running == [high])
            await tx.commit()
            await anyio.sleep(1.5)  # several polls: the low id must stay pending meanwhile
            assert running == [high]
            assert await _statuses(db, names, [low], {"pending"})
            release.set()
            await wait_until(lambda: _statuses(db, names, [low, high], {"sent"}))
        assert running == [high, low]
    finally:
        await late.close()


async def _all_sent(db: asyncpg.Connection, names: Names, n: int) -> bool:
    return await count_by_status(db, names) == {"sent": n}


async def _statuses(db: asyncpg.Connection, names: Names, ids: list[int], want: set[str]) -> bool:
    rows = await db.fetch(
        f'SELECT DISTINCT status FROM "{names.schema}".intent WHERE id = ANY($1)', ids
    )
    return {r["status"] for r in rows} == want


ORDERING_SQL = doc_snippet("concepts/ordering.md", "Ordering keys", "sql").text


async def test_the_documented_ordering_snippet_runs(db, names: Names):
    intent_id = await db.fetchval(ORDERING_SQL.replace("outbox.", f'"{names.schema}".'))
    row = await db.fetchrow(
        f'SELECT kind, ordering_key FROM "{names.schema}".intent WHERE id = $1', intent_id
    )
    assert tuple(row) == ("order_event", "order-42")
