"""Ordering keys with real worker processes, under the faults the suite injects.

Several `outbox-worker` processes deliver intents of 300 keys (the fault variants fewer)
enqueued by concurrent producers in interleaved transactions, mixed with unordered intents;
the handler (tests/sample_handlers.py: ``ordered``) takes 0–3 ms, fails the first attempt
of some intents, and records every attempt's start and end, from every process, in one file.

Invariant, per key: no attempt of intent n+1 starts before intent n's first successful end
(so a retry keeps its place, and a head that was in flight at a kill or a lost lease is
delivered again before its successors); nothing is lost; unordered intents flow. Without a
fault, the attempts of one key never overlap at all.
"""

from __future__ import annotations

import itertools
import random
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.lowlevel
import asyncpg
import orjson
import pytest

from tests.conftest import wait_until
from tests.fault.ledger import Outbox
from tests.fault.workers import WorkerProcess
from tests.tcp_proxy import TcpProxy

LEASE = 3.0


@dataclass
class Attempts:
    """Every attempt any worker process made, read back from the handler's file."""

    starts: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    ok_ends: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    spans: dict[int, list[tuple[float, float]]] = field(default_factory=lambda: defaultdict(list))

    @classmethod
    def read(cls, path: Path) -> Attempts:
        found = cls()
        open_starts: dict[int, list[float]] = defaultdict(list)
        for line in path.read_bytes().splitlines():
            record = orjson.loads(line)
            i = record["id"]
            if "start" in record:
                found.starts[i].append(record["start"])
                open_starts[i].append(record["start"])
            else:
                start = open_starts[i].pop(0) if open_starts[i] else record["end"]
                found.spans[i].append((start, record["end"]))
                if record["ok"]:
                    found.ok_ends[i].append(record["end"])
        return found

    def check(self, ids_by_key: dict[str, list[int]], *, faults: bool) -> int:
        """Assert the invariant; returns how many intents were attempted more than once."""
        for key, ids in ids_by_key.items():
            for before, after in itertools.pairwise(ids):
                assert self.ok_ends[before], f"{key}: intent {before} never succeeded"
                assert min(self.starts[after]) > min(self.ok_ends[before]), (
                    f"{key}: intent {after} started before {before} had succeeded"
                )
            if not faults:
                spans = sorted(s for i in ids for s in self.spans[i])
                for (_, end), (start, _) in itertools.pairwise(spans):
                    assert start > end, f"{key}: two attempts overlapped"
        return sum(1 for starts in self.starts.values() if len(starts) > 1)


async def produce(
    pg_dsn: str, schema: str, keys: int, per_key: int, *, producers: int = 4, seed: int = 1
) -> tuple[dict[str, list[int]], list[int]]:
    """Keyed intents from concurrent producers, each transaction touching a few keys, plus
    one unordered intent per key. Each producer locks the keys it writes (as an application
    locks its aggregate row), so commit order per key is id order. 1 in 10 fails its first
    attempt."""
    rng = random.Random(seed)
    todo = [f"order-{k}" for k in range(keys) for _ in range(per_key)]
    rng.shuffle(todo)
    ids: dict[str, list[int]] = defaultdict(list)
    unordered: list[int] = []
    sql = f"SELECT \"{schema}\".enqueue('ordered', $1::jsonb, ordering_key => $2)"

    async def producer(n: int) -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            local = random.Random(seed * 100 + n)
            while todo:
                batch = sorted(todo.pop() for _ in range(min(len(todo), local.randint(1, 5))))
                async with conn.transaction():
                    for key in batch:
                        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", key)
                        payload = orjson.dumps({"fail_first": local.random() < 0.1}).decode()
                        ids[key].append(await conn.fetchval(sql, payload, key))
                    unordered.append(await conn.fetchval(sql, "{}", None))
                await anyio.lowlevel.checkpoint()  # let the other producers interleave
        finally:
            await conn.close()

    async with anyio.create_task_group() as tg:
        for n in range(producers):
            tg.start_soon(producer, n)
    for key_ids in ids.values():
        key_ids.sort()
    assert sum(map(len, ids.values())) == keys * per_key
    return ids, unordered


def attempts_env(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    path = tmp_path / "attempts.jsonl"
    return path, {"OUTBOX_TEST_ATTEMPTS": str(path)}


async def sent_at_least(outbox: Outbox, n: int) -> bool:
    return (await outbox.counts())["sent"] >= n


@pytest.mark.parametrize("listen", [True, False], ids=["listen", "poll-only"])
async def test_keys_in_order_across_worker_processes(
    tmp_path, outbox, spawn, pg_dsn, schema, listen
):
    path, env = attempts_env(tmp_path)
    extra = [] if listen else ["--no-listen"]
    for _ in range(3):
        await spawn(concurrency=16, env=env, extra=extra, poll_interval=0.3)
    ids, unordered = await produce(pg_dsn, schema, keys=300 if listen else 100, per_key=20)
    await outbox.wait_settled(timeout=120)
    counts = await outbox.counts()
    assert counts == {"sent": sum(map(len, ids.values())) + len(unordered)}, counts
    attempts = Attempts.read(path)
    retried = attempts.check(ids, faults=False)
    assert retried > 0  # the retries happened, and kept their place
    assert all(attempts.ok_ends[i] for i in unordered)


Fault = Callable[[list[WorkerProcess], dict[str, str]], Awaitable[None]]


async def run_with_fault(
    tmp_path: Path, outbox: Outbox, spawn, pg_dsn: str, schema: str, fault: Fault, **first
) -> tuple[Attempts, dict[str, list[int]]]:
    """Two workers (the first with ``first`` as spawn options), 100 keys x 20 intents from
    the producers; ``fault`` strikes once 400 are sent. Returns the attempts, checked."""
    path, env = attempts_env(tmp_path)
    workers = [
        await spawn(concurrency=16, env=env, lease=LEASE, **first),
        await spawn(concurrency=16, env=env, lease=LEASE),
    ]
    for worker in workers:
        await worker.ready()
    produced: list[tuple[dict[str, list[int]], list[int]]] = []

    async def run_producers() -> None:
        produced.append(await produce(pg_dsn, schema, keys=100, per_key=20))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_producers)
        await wait_until(lambda: sent_at_least(outbox, 400), timeout=60)
        await fault(workers, env)
    ids, unordered = produced[0]
    await outbox.wait_settled(timeout=120)
    assert await outbox.counts() == {"sent": 2000 + len(unordered)}
    attempts = Attempts.read(path)
    attempts.check(ids, faults=True)
    return attempts, ids


async def test_kill9_mid_run_redelivers_the_heads_first(tmp_path, outbox, spawn, pg_dsn, schema):
    in_flight: set[int] = set()

    async def kill_one(workers: list[WorkerProcess], env: dict[str, str]) -> None:
        async def holds_a_keyed_intent() -> bool:
            # Deliveries take 0-3 ms: at any one moment the worker may hold none, so wait
            # for a moment when it holds a key's head (any keyed intent it holds is one).
            in_flight.clear()
            in_flight.update(await outbox.processing(workers[0].pid))
            return bool(
                await outbox.conn.fetchval(
                    f"SELECT count(*) FROM {outbox.table} "
                    "WHERE id = ANY($1) AND ordering_key IS NOT NULL",
                    list(in_flight),
                )
            )

        await wait_until(holds_a_keyed_intent, timeout=60, interval=0.005)
        workers[0].kill()
        await spawn(concurrency=16, env=env, lease=LEASE)  # a replacement

    attempts, ids = await run_with_fault(tmp_path, outbox, spawn, pg_dsn, schema, kill_one)
    keyed = in_flight & {i for key_ids in ids.values() for i in key_ids}
    assert keyed, "the kill should have caught some keys' heads in flight"
    # Started by the killed worker, finished by another: and still before their successors.
    assert all(attempts.ok_ends[i] for i in keyed)


async def test_lease_expiry_of_a_paused_worker(tmp_path, outbox, spawn, pg_dsn, schema):
    async def pause_one(workers: list[WorkerProcess], _env: dict[str, str]) -> None:
        held = list(await outbox.processing(workers[0].pid))
        workers[0].pause()
        try:  # its rows are rescued once their leases run out, and delivered by the other
            await wait_until(
                lambda: outbox.conn.fetchval(
                    f"SELECT count(*) = 0 FROM {outbox.table} "
                    "WHERE id = ANY($1) AND status = 'processing'",
                    held,
                ),
                timeout=60,
            )
        finally:
            workers[0].resume()

    await run_with_fault(tmp_path, outbox, spawn, pg_dsn, schema, pause_one)


async def test_network_freeze_mid_run(tmp_path, outbox, spawn, pg_dsn, schema, pg_proxy: TcpProxy):
    async def freeze(_workers: list[WorkerProcess], _env: dict[str, str]) -> None:
        pg_proxy.freeze()
        await anyio.sleep(2 * LEASE)  # the fault's length, not synchronisation
        pg_proxy.heal()

    await run_with_fault(
        tmp_path, outbox, spawn, pg_dsn, schema, freeze, dsn=pg_proxy.rewrite(pg_dsn)
    )
