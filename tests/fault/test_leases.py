"""Deliveries slower than the lease, with two worker processes on the same table.

Invariants: while a worker is alive its heartbeat keeps a slow delivery its own (no other
worker takes it over, it is delivered once). When its heartbeat stops (the process is
paused by SIGSTOP, as by a long GC pause or a VM migration), the lease expires, the other
worker takes the intent over and delivers it, and the first worker's late outcome is
fenced off: it cannot overwrite the second owner's result.

(The heartbeat switched off by configuration is covered in-process by
tests/test_relay.py::test_expired_lease_is_reclaimed_and_the_stale_ack_is_fenced; the
CLI has no switch for it, on purpose.)
"""

from __future__ import annotations

from tests.fault.ledger import Fault, check_ledger, delivered
from tests.smtp_server import Script, Step, reply

LEASE = 3.0  # heartbeat every second: margin for a loaded machine


async def test_heartbeat_keeps_a_delivery_slower_than_the_lease(outbox, smtp, spawn):
    smtp.script(Script(data=Step(delay=2 * LEASE)))  # the first message takes 2 leases
    a = await spawn(smtp_url=smtp.url(), concurrency=2, lease=LEASE)
    b = await spawn(smtp_url=smtp.url(), concurrency=2, lease=LEASE)
    committed = await outbox.enqueue_emails(5, per_transaction=5)
    await outbox.wait_settled(timeout=60)
    report = await check_ledger(outbox, delivered(smtp), committed=committed)
    assert report.duplicates == 0 and smtp.transactions == 5
    attempts = await outbox.conn.fetch(f"SELECT attempts FROM {outbox.table}")
    assert {r["attempts"] for r in attempts} == {1}
    for worker in (a, b):
        for sign in ("lost the lease", "lease lost", "rescued"):
            assert not worker.logged(sign), worker.tail()


async def test_paused_worker_loses_its_lease_and_its_late_outcome_is_fenced(outbox, smtp, spawn):
    # A's transaction is answered "550" after a while: if A's late outcome were written,
    # the intent would end dead although B delivered it.
    smtp.script(Script(data=reply(550, delay=LEASE)))
    a = await spawn(smtp_url=smtp.url(), concurrency=1, lease=LEASE)
    a_id = await a.ready()
    [intent] = await outbox.enqueue_emails(1)
    await smtp.wait_until(lambda: smtp.transactions == 1, what="A's transaction")
    in_flight = await outbox.processing()
    a.pause()  # A's heartbeat stops with it
    try:
        b = await spawn(smtp_url=smtp.url(), concurrency=1, lease=LEASE)
        await outbox.wait_settled(timeout=30)  # B rescued it and delivered it
        row = await outbox.conn.fetchrow(f"SELECT * FROM {outbox.table} WHERE id = $1", intent)
        assert (row["status"], row["attempts"]) == ("sent", 2), dict(row)
        assert f"lease expired while held by {a_id}" in row["last_error"]
    finally:
        a.resume()
    # A wakes up, reads its 550, and tries to record "dead": the fence refuses.
    await a.wait_for_log("lease lost before its outcome (Dead) was recorded", timeout=30)
    after = await outbox.conn.fetchrow(f"SELECT * FROM {outbox.table} WHERE id = $1", intent)
    assert (after["status"], after["sent_at"]) == ("sent", row["sent_at"])
    report = await check_ledger(
        outbox,
        delivered(smtp),
        committed=[intent],
        faults=[Fault("worker paused past its lease", in_flight)],
    )
    assert delivered(smtp)[intent] == 1 and report.duplicates == 0
    assert a.running and b.running
