"""SIGTERM while the worker is busy: the two-phase stop under load.

Invariant: exit code 0 within the grace period (plus the bounded flush), and nothing left
``processing`` by that worker: in-flight deliveries either finish and are recorded, or are
cancelled at the end of the grace period and released back to ``pending`` with their
attempt given back. Another worker then delivers the rest; a stop that let everything
finish produces no duplicate at all.
"""

from __future__ import annotations

import signal
import time

from tests.fault.ledger import Fault, check_ledger, delivered
from tests.smtp_server import Script, Step

MARGIN = 5.0  # process exit, the final outcome flush, a loaded CI machine


async def test_sigterm_under_load_finishes_in_flight_work(outbox, smtp, spawn):
    grace = 5.0
    smtp.default_script = Script(data=Step(delay=0.1))  # every slot stays busy
    committed = await outbox.enqueue_emails(600)
    worker = await spawn(smtp_url=smtp.url(), concurrency=16, grace=grace)
    await smtp.wait_until(lambda: len(smtp.messages) >= 100, timeout=60, what="deliveries")
    in_flight = await outbox.processing()
    stopped_at = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert await worker.wait(timeout=grace + 30) == 0, worker.tail()
    took = time.monotonic() - stopped_at
    left = await outbox.processing(locked_by_pid=worker.pid)
    print(f"\nSIGTERM with {len(in_flight)} in flight: exit 0 after {took:.2f}s (grace {grace:g}s)")
    assert took <= grace + MARGIN
    assert left == frozenset()
    assert not worker.logged("grace period over")  # 0.1 s deliveries all finished
    await spawn(smtp_url=smtp.url(), concurrency=16)
    await outbox.wait_settled(timeout=120)
    report = await check_ledger(outbox, delivered(smtp), committed=committed)
    assert report.duplicates == 0


async def test_sigterm_cancels_deliveries_that_outlast_the_grace_period(outbox, smtp, spawn):
    grace, slots = 1.0, 8
    smtp.script(*[Script(data=Step(delay=60))] * slots)  # the first ones hang at DATA
    committed = await outbox.enqueue_emails(100)
    worker = await spawn(smtp_url=smtp.url(), concurrency=slots, grace=grace)
    await smtp.wait_until(lambda: smtp.transactions >= slots, what="slow transactions")
    in_flight = await outbox.processing()
    stopped_at = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert await worker.wait(timeout=grace + 30) == 0, worker.tail()
    took = time.monotonic() - stopped_at
    print(f"\nSIGTERM with {len(in_flight)} stuck deliveries: exit 0 after {took:.2f}s")
    assert took <= grace + MARGIN
    assert worker.logged("grace period over")
    assert await outbox.processing() == frozenset()
    released = await outbox.conn.fetch(
        f"SELECT attempts, locked_by FROM {outbox.table} WHERE id = ANY($1)", list(in_flight)
    )
    assert {(r["attempts"], r["locked_by"]) for r in released} == {(0, None)}
    await spawn(smtp_url=smtp.url(), concurrency=slots)
    await outbox.wait_settled(timeout=60)
    await check_ledger(
        outbox,
        delivered(smtp),
        committed=committed,
        faults=[Fault("cancelled at the end of the grace period", in_flight)],
    )
