"""The heartbeat against the outcome writer, in-process (so the relay's own stats can be read).

Found by test_many_workers (a "lost the lease" warning with no fault injected). The
heartbeat's UPDATE waited on row locks: rows whose outcome the writer was recording at
that moment. Deliveries finish out of id order, so the writer's batch and the heartbeat
locked the same rows in opposite orders: a deadlock, detected after deadlock_timeout (1 s),
with the heartbeat or the outcome write aborted. And rows the writer had just recorded
were reported lost when the heartbeat's answer was read before the writer's.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable

import anyio
import asyncpg
import pytest

from tests.conftest import Recorder, wait_until
from worker.intent import Intent
from worker.producer import enqueue


async def test_heartbeat_skips_a_locked_row_instead_of_waiting_for_it(
    pg_dsn, db, names, start_relay, caplog: pytest.LogCaptureFixture
):
    """Invariant: a row someone holds locked (the outcome writer, normally) stalls neither
    the renewal of the other leases nor is reported lost; it is renewed once free."""
    caplog.set_level(logging.WARNING, logger="outbox")
    release = anyio.Event()

    async def hold(_intent: Intent) -> None:
        await release.wait()

    rec = Recorder(hold)
    table = f'"{names.schema}".intent'

    async def lease_of(intent_id: int) -> object:
        return await db.fetchval(f"SELECT locked_until FROM {table} WHERE id = $1", intent_id)

    async with start_relay({"hold": rec}, lease=4.0) as relay:
        async with db.transaction():  # a gets the lower id: the heartbeat meets it first
            a = await enqueue(db, "hold", {}, schema=names.schema)
            c = await enqueue(db, "hold", {}, schema=names.schema)
        await wait_until(lambda: rec.calls[a] == 1 and rec.calls[c] == 1)
        locker = await asyncpg.connect(pg_dsn)
        try:
            async with locker.transaction():
                await locker.execute(f"SELECT 1 FROM {table} WHERE id = $1 FOR UPDATE", a)
                before = await lease_of(c)
                # The next beat (every lease/3) must renew c although a is locked.
                await wait_until(lambda: _later(lease_of(c), before), timeout=6)
            before = await lease_of(a)
            await wait_until(lambda: _later(lease_of(a), before), timeout=6)
        finally:
            await locker.close()
        release.set()
        await wait_until(lambda: sum(relay.stats.sent.values()) == 2)
    assert relay.stats.lease_lost == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert rec.calls == {a: 1, c: 1}


async def _later(value: Awaitable[object], than: object) -> bool:
    return bool(await value > than)  # type: ignore[operator]


@pytest.mark.slow
async def test_heartbeat_and_writer_under_out_of_order_completions(
    db, names, start_relay, caplog: pytest.LogCaptureFixture
):
    """Invariant: with no fault injected, no warning at all (no deadlock, no lost lease)."""

    async def out_of_order(_intent: Intent) -> None:
        await anyio.sleep(random.random() * 0.02)

    rec = Recorder(out_of_order)
    caplog.set_level(logging.WARNING, logger="outbox")
    n = 30000
    async with start_relay(
        {"noop": rec}, concurrency=64, lease=1.2, ping_interval=0.2, ping_timeout=1.0
    ) as relay:
        await db.execute(
            f'INSERT INTO "{names.schema}".intent (kind, payload) '
            "SELECT 'noop', '{}' FROM generate_series(1, $1)",
            n,
        )
        await wait_until(lambda: sum(relay.stats.sent.values()) == n, timeout=120)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert relay.stats.lease_lost == 0
    assert max(rec.calls.values()) == 1 and len(rec.calls) == n
