"""kill -9 of the worker at random points while thousands of intents are in flight.

Invariant: after restarts every committed intent is sent, none is left ``processing``,
rolled-back intents are never delivered, and every duplicate is an intent that the killed
process held (``processing``, locked by it) when it died, at most once per kill.
"""

from __future__ import annotations

import random

import pytest

from tests.fault.conftest import Spawn
from tests.fault.ledger import Fault, Outbox, check_ledger, delivered
from tests.smtp_server import SmtpTestServer


async def _kill_and_restart(
    seed: int, outbox: Outbox, smtp: SmtpTestServer, spawn: Spawn, *, n: int, kills: int
) -> None:
    rng = random.Random(seed)
    committed = await outbox.enqueue_emails(n // 2, per_transaction=500)
    rolled_back = await outbox.rolled_back_emails(200)
    faults: list[Fault] = []
    worker = await spawn(smtp_url=smtp.url(), concurrency=16, lease=3.0)
    for k in range(kills):
        if k == 1:  # more work arrives while the worker is being killed and restarted
            committed += await outbox.enqueue_emails(n - n // 2, per_transaction=250)
        # A random point in the stream of deliveries (by progress, not by wall time).
        target = len(smtp.messages) + rng.randint(20, n // (kills + 1))
        await smtp.wait_until(
            lambda t=target: len(smtp.messages) >= t, timeout=60, what=f"{target} messages"
        )
        worker.kill()
        assert await worker.wait(timeout=10) == -9
        # What the dead process held; nothing can move it until its lease expires.
        held = await outbox.processing(locked_by_pid=worker.pid)
        faults.append(Fault(f"kill -9 #{k + 1}", held))
        worker = await spawn(smtp_url=smtp.url(), concurrency=16, lease=3.0)
    await outbox.wait_settled(timeout=90)
    report = await check_ledger(
        outbox, delivered(smtp), committed=committed, rolled_back=rolled_back, faults=faults
    )
    print(f"\nseed {seed}: {len(committed)} intents, {kills} kills: {report.line()}")
    assert report.counts == {"sent": len(committed)}


@pytest.mark.parametrize("seed", [1, 2])
async def test_kill9_at_random_points_loses_nothing(seed: int, outbox, smtp, spawn):
    await _kill_and_restart(seed, outbox, smtp, spawn, n=3000, kills=3)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("seed", range(10, 20))
async def test_kill9_soak(seed: int, outbox, smtp, spawn):
    await _kill_and_restart(seed, outbox, smtp, spawn, n=10000, kills=5)
