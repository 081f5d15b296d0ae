"""Several worker processes on one database, a healthy SMTP server: exactly once.

Invariant: with no fault at all, every intent is delivered exactly once, whichever process
claimed it, and the table says ``sent`` for all of them.
"""

from __future__ import annotations

import time

import pytest

from tests.fault.ledger import check_ledger, delivered


async def _exactly_once(outbox, smtp, spawn, *, workers: int, n: int) -> None:
    procs = [await spawn(smtp_url=smtp.url(), concurrency=8) for _ in range(workers)]
    for proc in procs:
        await proc.ready()
    started = time.monotonic()
    # Producers keep committing while the workers drain: claims race with inserts.
    committed = await outbox.enqueue_emails(n, per_transaction=500)
    await outbox.wait_settled(timeout=240)
    elapsed = time.monotonic() - started
    report = await check_ledger(outbox, delivered(smtp), committed=committed)
    by_worker = await outbox.conn.fetch(
        f"SELECT count(*) AS n FROM {outbox.table} GROUP BY attempts"
    )
    print(
        f"\n{workers} workers, {n} intents in {elapsed:.1f}s ({n / elapsed:.0f}/s): "
        f"{report.line()}; attempts histogram {[r['n'] for r in by_worker]}"
    )
    assert report.duplicates == 0
    assert report.counts == {"sent": n}
    assert len(smtp.accepted) == n
    for proc in procs:
        assert proc.running, proc.tail()
        # No fault, so no lease was lost, no row rescued, no outcome write failed.
        for sign in ("lost the lease", "lease lost", "rescued", "could not record"):
            assert not proc.logged(sign), proc.tail()


async def test_three_workers_deliver_every_intent_exactly_once(outbox, smtp, spawn):
    await _exactly_once(outbox, smtp, spawn, workers=3, n=6000)


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_four_workers_fifty_thousand_intents_exactly_once(outbox, smtp, spawn):
    await _exactly_once(outbox, smtp, spawn, workers=4, n=50000)
