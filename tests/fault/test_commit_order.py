"""Ids are taken at insert, rows become visible at commit: commit order is not id order.

Invariant: a transaction that took a low id and commits seconds after many later ids were
delivered is still delivered, promptly (no "id > last seen" cursor); transactions that
roll back, early or late, are never delivered.
"""

from __future__ import annotations

import time

import anyio
import asyncpg
import pytest

from tests.fault.ledger import Outbox, check_ledger, delivered

HOLD = 2.0  # how long the slow transaction stays open after the later ids are delivered
MARGIN = 2.0


async def _open_transaction(pg_dsn: str, schema: str) -> tuple[asyncpg.Connection, object]:
    conn = await asyncpg.connect(pg_dsn)
    tx = conn.transaction()
    await tx.start()
    return conn, tx


@pytest.mark.parametrize("listen", [True, False], ids=["listen", "poll-only"])
async def test_late_commit_of_a_low_id_is_delivered_and_rollbacks_never(
    outbox, smtp, spawn, pg_dsn, schema, listen: bool
):
    poll = 1.0
    worker = await spawn(
        smtp_url=smtp.url(), poll_interval=poll, extra=[] if listen else ["--no-listen"]
    )
    await worker.ready()
    slow_conn, slow_tx = await _open_transaction(pg_dsn, schema)
    doomed_conn, doomed_tx = await _open_transaction(pg_dsn, schema)
    try:
        low = await Outbox(slow_conn, schema).enqueue_emails(3, per_transaction=3)
        doomed_early = await outbox.rolled_back_emails(5)
        doomed_late = await Outbox(doomed_conn, schema).enqueue_emails(5, per_transaction=5)
        later = await outbox.enqueue_emails(500, per_transaction=50)
        assert max(low) < min(later)
        await outbox.wait_settled(timeout=60)  # every later id is delivered...
        await anyio.sleep(HOLD)  # ...and the slow transaction stays open a while longer
        await doomed_tx.rollback()  # type: ignore[attr-defined]
        await slow_tx.commit()  # type: ignore[attr-defined]
        committed_at = time.monotonic()
    finally:
        await slow_conn.close()
        await doomed_conn.close()
    await outbox.wait_settled(timeout=30)
    took = time.monotonic() - committed_at
    report = await check_ledger(
        outbox,
        delivered(smtp),
        committed=[*low, *later],
        rolled_back=[*doomed_early, *doomed_late],
    )
    print(
        f"\n{'LISTEN' if listen else 'poll only'}: low ids {low} committed after "
        f"{len(later)} later ones, delivered {took:.2f}s after their commit; {report.line()}"
    )
    assert report.duplicates == 0
    assert took <= poll * 1.2 + MARGIN
