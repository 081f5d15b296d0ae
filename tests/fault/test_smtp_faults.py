"""The SMTP server misbehaves, one way per case, for the first transaction only.

Invariant: 4xx is retried until it is sent; 5xx is dead after one attempt; a connection
dropped after DATA (the server has the message, the worker cannot know) is sent again, a
duplicate counted against that one in-flight intent; a server that stalls is cut off by
the per-delivery timeout, which frees the slot for the next intent. Intents behind the
faulty one are delivered normally.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

from tests.fault.ledger import Fault, check_ledger, delivered
from tests.smtp_server import DROP, STALL, Script, reply


@dataclass(frozen=True)
class Case:
    script: Script
    status: str
    attempts: int
    error: str
    deliveries: int  # how many times the server got the faulty intent's message


CASES = {
    "421 at MAIL, then ok": Case(Script(mail=reply(421)), "sent", 2, "421", 1),
    "451 at DATA, then ok": Case(Script(data=reply(451)), "sent", 2, "451", 1),
    "452 at RCPT, then ok": Case(Script(rcpt=reply(452)), "sent", 2, "452", 1),
    "550 at DATA: dead": Case(Script(data=reply(550)), "dead", 1, "550", 0),
    "553 at RCPT: dead": Case(Script(rcpt=reply(553)), "dead", 1, "553", 0),
    "dropped after DATA": Case(Script(data=DROP), "sent", 2, "connection", 2),
    "stalled at DATA": Case(Script(data=STALL), "sent", 2, "timed out after 1s", 2),
}


@pytest.mark.parametrize("name", CASES)
async def test_smtp_fault(name: str, outbox, smtp, spawn):
    case = CASES[name]
    smtp.script(case.script)  # the first transaction misbehaves, the rest are fine
    # One slot, so the intent behind the faulty one can only go once the slot is freed.
    worker = await spawn(smtp_url=smtp.url(), concurrency=1, extra=["--delivery-timeout", "1"])
    await worker.ready()
    started = time.monotonic()
    [faulty, *others] = await outbox.enqueue_emails(4, per_transaction=4)
    await outbox.wait_settled(timeout=30)
    elapsed = time.monotonic() - started
    row = await outbox.conn.fetchrow(f"SELECT * FROM {outbox.table} WHERE id = $1", faulty)
    assert (row["status"], row["attempts"]) == (case.status, case.attempts), dict(row)
    assert case.error in (row["last_error"] or ""), row["last_error"]
    report = await check_ledger(
        outbox,
        delivered(smtp),
        committed=[faulty, *others],
        faults=[Fault(name, frozenset({faulty}))],
        may_be_dead={faulty} if case.status == "dead" else (),
    )
    assert delivered(smtp)[faulty] == case.deliveries
    assert all(delivered(smtp)[i] == 1 for i in others)
    assert report.duplicates == max(case.deliveries - 1, 0)
    if name == "stalled at DATA":
        # Cut off at the 1 s delivery timeout, not aiosmtplib's 30 s one.
        assert elapsed < 10, elapsed
        await smtp.wait_until(lambda: smtp.open_connections <= 1, what="stalled connection closed")
