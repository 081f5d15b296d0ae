"""The relay against a real PostgreSQL: claims, wake-ups, leases, outcomes."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import asyncpg
import orjson

from tests.conftest import Recorder, count_by_status, wait_until
from worker import PermanentError, TransientError
from worker.intent import Intent
from worker.producer import enqueue
from worker.store.sqlfiles import Names


async def test_committed_intent_is_delivered_and_marked_sent(db, names: Names, start_relay):
    rec = Recorder()
    async with start_relay({"noop": rec}):
        async with db.transaction():
            intent_id = await enqueue(db, "noop", {"n": 1}, schema=names.schema)
        await wait_until(lambda: rec.calls[intent_id] == 1)
        await wait_until(lambda: _status(db, names, intent_id, "sent"))
    row = await db.fetchrow(f'SELECT * FROM "{names.schema}".intent WHERE id = $1', intent_id)
    assert row["attempts"] == 1
    assert row["sent_at"] is not None and row["locked_by"] is None
    assert orjson.loads(row["payload"]) == {"n": 1}


async def test_rolled_back_intent_is_never_delivered(db, names: Names, start_relay):
    rec = Recorder()
    async with start_relay({"noop": rec}) as relay:
        tx = db.transaction()
        await tx.start()
        await enqueue(db, "noop", {"rolled": "back"}, schema=names.schema)
        await tx.rollback()
        async with db.transaction():
            marker = await enqueue(db, "noop", {"committed": True}, schema=names.schema)
        await wait_until(lambda: rec.calls[marker] == 1)
        # The committed intent was enqueued after the rolled-back one: once it has been
        # delivered, a poll has had every chance to see the other.
        polls = relay.stats.last_poll
        await wait_until(lambda: relay.stats.last_poll != polls)
    assert list(rec.calls) == [marker]
    assert await count_by_status(db, names) == {"sent": 1}


async def test_ten_thousand_row_insert_wakes_the_pool_once(db, names: Names, start_relay):
    rec = Recorder()
    async with start_relay({"noop": rec}, concurrency=16, poll_interval=30.0) as relay:
        await wait_until(lambda: relay.idle_declared)
        await db.execute(
            f'INSERT INTO "{names.schema}".intent (kind, payload) '
            "SELECT 'noop', jsonb_build_object('n', g) FROM generate_series(1, 10000) g"
        )
        await wait_until(lambda: relay.stats.sent["noop"] == 10000, timeout=60)
        assert relay.stats.notifications == 1
    assert len(rec.calls) == 10000 and set(rec.calls.values()) == {1}
    assert await count_by_status(db, names) == {"sent": 10000}


async def test_two_relays_never_deliver_the_same_intent(db, names: Names, start_relay):
    rec = Recorder(lambda _intent: anyio.lowlevel.checkpoint())
    async with start_relay({"noop": rec}, concurrency=8), start_relay({"noop": rec}, concurrency=8):
        for _ in range(10):
            async with db.transaction():
                for n in range(200):
                    await enqueue(db, "noop", {"n": n}, schema=names.schema)
        await wait_until(lambda: len(rec.calls) == 2000, timeout=60)
        await wait_until(lambda: _count(db, names, "sent", 2000), timeout=30)
    assert set(rec.calls.values()) == {1}


async def test_killed_listen_backend_still_delivers_and_reconnects(db, names: Names, start_relay):
    rec = Recorder()
    async with start_relay({"noop": rec}) as relay:
        await wait_until(lambda: relay.listener is not None and relay.listener.backend_pid)
        assert relay.listener is not None
        await db.execute("SELECT pg_terminate_backend($1)", relay.listener.backend_pid)
        async with db.transaction():
            intent_id = await enqueue(db, "noop", {}, schema=names.schema)
        await wait_until(lambda: rec.calls[intent_id] == 1)
        await wait_until(lambda: relay.stats.listener_reconnects >= 1)
        assert relay.stats.listener_connected


async def test_transient_failures_are_retried_then_sent(db, names: Names, start_relay):
    async def flaky(intent: Intent) -> None:
        if intent.attempts < 3:
            raise TransientError(f"try {intent.attempts} failed")

    rec = Recorder(flaky)
    # A 30 s poll: the retries (50-200 ms backoff) can only be this quick if the relay
    # wakes by itself when the next one falls due.
    async with start_relay({"flaky": rec}, poll_interval=30.0):
        async with db.transaction():
            intent_id = await enqueue(db, "flaky", {}, schema=names.schema)
        await wait_until(lambda: _status(db, names, intent_id, "sent"))
    row = await db.fetchrow(f'SELECT * FROM "{names.schema}".intent WHERE id = $1', intent_id)
    assert row["attempts"] == 3 and rec.calls[intent_id] == 3
    assert row["last_error"] == "try 2 failed"


async def test_permanent_failure_unknown_kind_and_exhaustion_are_dead(
    db, names: Names, start_relay
):
    async def reject(_intent: Intent) -> None:
        raise PermanentError("recipient does not exist")

    async def always_down(_intent: Intent) -> None:
        raise ConnectionError("broker down")

    good = Recorder()
    async with start_relay({"reject": reject, "down": always_down, "good": good}):
        async with db.transaction():
            rejected = await enqueue(db, "reject", {}, schema=names.schema)
            exhausted = await enqueue(db, "down", {}, schema=names.schema, max_attempts=2)
            unknown = await enqueue(db, "no-such-kind", {}, schema=names.schema)
            fine = [await enqueue(db, "good", {"n": n}, schema=names.schema) for n in range(20)]
        for intent_id in (rejected, exhausted, unknown):
            await wait_until(lambda i=intent_id: _status(db, names, i, "dead"))
        await wait_until(lambda: all(good.calls[i] == 1 for i in fine))
    errors = {
        r["id"]: (r["attempts"], r["last_error"])
        for r in await db.fetch(f'SELECT * FROM "{names.schema}".intent WHERE status = $1', "dead")
    }
    assert errors[rejected] == (1, "recipient does not exist")
    assert errors[exhausted][0] == 2
    assert errors[exhausted][1].startswith("attempts exhausted (2/2)")
    assert "ConnectionError: broker down" in errors[exhausted][1]
    assert errors[unknown][0] == 1 and "unknown kind 'no-such-kind'" in errors[unknown][1]


async def test_expired_lease_is_reclaimed_and_the_stale_ack_is_fenced(
    db, names: Names, start_relay
):
    release_first = anyio.Event()
    first_started = anyio.Event()

    async def slow_first_time(intent: Intent) -> None:
        if intent.attempts == 1:
            first_started.set()
            await release_first.wait()

    rec = Recorder(slow_first_time)
    # Worker A holds the row past its lease (no heartbeat), so it is rescued and delivered
    # again, by B or by one of A's own idle slots: any worker may take it over.
    async with start_relay({"slow": rec}, lease=1.5, heartbeat=False) as a:
        async with db.transaction():
            intent_id = await enqueue(db, "slow", {}, schema=names.schema)
        with anyio.fail_after(20):
            await first_started.wait()
        async with start_relay({"slow": rec}, lease=1.5):
            await wait_until(lambda: _status(db, names, intent_id, "sent"))
        release_first.set()
        await wait_until(lambda: a.stats.lease_lost == 1)
    row = await db.fetchrow(f'SELECT * FROM "{names.schema}".intent WHERE id = $1', intent_id)
    assert rec.calls[intent_id] == 2  # delivered once more: at-least-once
    assert row["status"] == "sent" and row["attempts"] == 2
    assert "lease expired" in row["last_error"]  # the rescue said why it happened


async def test_heartbeat_keeps_a_slow_delivery_from_being_taken_over(db, names: Names, start_relay):
    async def slow(_intent: Intent) -> None:
        await anyio.sleep(2.5)

    rec = Recorder(slow)
    async with (
        start_relay({"slow": rec}, lease=1.5) as a,
        start_relay({"slow": rec}, lease=1.5),
    ):
        async with db.transaction():
            intent_id = await enqueue(db, "slow", {}, schema=names.schema)
        await wait_until(lambda: _status(db, names, intent_id, "sent"))
    assert rec.calls[intent_id] == 1 and a.stats.lease_lost == 0


async def test_scheduled_intent_waits_for_run_at(db, names: Names, start_relay):
    rec = Recorder()
    async with start_relay({"noop": rec}, poll_interval=30.0):
        async with db.transaction():
            later = await db.fetchval(
                f"SELECT \"{names.schema}\".enqueue($1, $2::jsonb, now() + interval '1 second')",
                "noop",
                "{}",
            )
        await anyio.sleep(0.3)
        assert rec.calls[later] == 0
        # Due in 1 s with a 30 s poll: the relay knows the next run_at and wakes for it.
        await wait_until(lambda: rec.calls[later] == 1, timeout=10)


async def test_dedupe_key_returns_the_first_id(db, names: Names):
    async with db.transaction():
        first = await enqueue(db, "noop", {"v": 1}, dedupe_key="order-7", schema=names.schema)
        second = await enqueue(db, "noop", {"v": 2}, dedupe_key="order-7", schema=names.schema)
    other = await enqueue(db, "noop", {"v": 3}, dedupe_key="order-8", schema=names.schema)
    assert first == second != other
    rows = await db.fetch(f'SELECT payload FROM "{names.schema}".intent ORDER BY id')
    assert [orjson.loads(r["payload"]) for r in rows] == [{"v": 1}, {"v": 3}]


async def test_check_constraints_reject_inconsistent_states(db, names: Names):
    intent_id = await enqueue(db, "noop", {}, schema=names.schema)
    table = f'"{names.schema}".intent'
    for bad in (
        f"UPDATE {table} SET status = 'sent' WHERE id = $1",  # no sent_at
        f"UPDATE {table} SET status = 'processing' WHERE id = $1",  # no lease
        f"UPDATE {table} SET status = 'dead' WHERE id = $1",  # no reason
        f"UPDATE {table} SET status = 'lost' WHERE id = $1",
    ):
        try:
            await db.execute(bad, intent_id)
        except asyncpg.CheckViolationError:
            continue
        raise AssertionError(f"accepted: {bad}")


async def _status(db: asyncpg.Connection, names: Names, intent_id: int, status: str) -> bool:
    got = await db.fetchval(f'SELECT status FROM "{names.schema}".intent WHERE id = $1', intent_id)
    return bool(got == status)


async def _count(db: asyncpg.Connection, names: Names, status: str, n: int) -> bool:
    got = await db.fetchval(
        f'SELECT count(*) FROM "{names.schema}".intent WHERE status = $1', status
    )
    return bool(got == n)


async def test_poll_only_mode_delivers_without_listen(db, names: Names, start_relay):
    rec = Recorder()
    async with start_relay({"noop": rec}, listen=False, poll_interval=0.3) as relay:
        assert relay.listener is None
        async with db.transaction():
            intent_id = await enqueue(db, "noop", {}, schema=names.schema)
        await wait_until(lambda: rec.calls[intent_id] == 1)
        assert relay.stats.notifications == 0 and not relay.idle_declared
    # Nobody asked producers to notify: a poll-only worker never sets the idle flag.
    assert await db.fetchval(f'SELECT count(*) FROM "{names.schema}".idle_worker') == 0
