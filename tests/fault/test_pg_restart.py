"""PostgreSQL itself goes away during delivery: `pg_ctl restart -m immediate` (a crash and
crash recovery), `-m fast` (every backend told to terminate), the server stopped for a while
then started, and a backend killed by SIGKILL (the postmaster then resets every
connection), on a cluster this suite starts itself.

Invariant: the worker recovers without help (same process, no restart), every committed
intent ends sent, nothing stays ``processing``, and duplicates are only intents that were
``processing`` when the server went down.
"""

from __future__ import annotations

import secrets
import time

import anyio
import asyncpg
import pytest

from tests.conftest import wait_until
from tests.fault.ledger import Fault, Outbox, check_ledger, delivered
from tests.fault.pgcluster import Cluster
from worker.settings import default_channel
from worker.store.migrate import migrate
from worker.store.sqlfiles import Names


async def _connect(dsn: str, timeout: float = 60) -> asyncpg.Connection:
    """Connect once the server accepts connections again (it may be in recovery)."""
    with anyio.fail_after(timeout):
        while True:
            try:
                return await asyncpg.connect(dsn, timeout=5)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                await anyio.sleep(0.1)


async def _crash(own_pg: Cluster, outbox: Outbox, how: str) -> frozenset[int]:
    """Bring the server down ``how``; return the ids processing at the crash."""
    before = await outbox.processing()
    if how in ("restart", "immediate"):
        await anyio.to_thread.run_sync(own_pg.restart, "immediate")
    elif how == "fast":
        await anyio.to_thread.run_sync(own_pg.restart, "fast")
    elif how == "stopped":  # down long enough for every worker to notice, then back
        await anyio.to_thread.run_sync(own_pg.stop, "fast")
        await anyio.sleep(3)
        await anyio.to_thread.run_sync(own_pg.start)
    else:  # a backend killed like by the OOM killer: every connection is reset
        own_pg.kill_backend(outbox.conn.get_server_pid())
    outbox.conn = await _connect(own_pg.dsn())
    # What was processing in the recovered database, read before any lease can expire:
    # these rows and only these can be delivered twice.
    return before | await outbox.processing()


async def _deliver_through_crashes(
    own_pg: Cluster, smtp, spawn, crashes: list[str], n: int, workers: int = 1
):
    schema = f"t_{secrets.token_hex(5)}"
    dsn = own_pg.dsn()
    conn = await asyncpg.connect(dsn)
    await migrate(conn, Names(schema, default_channel(schema)))
    outbox = Outbox(conn, schema)
    try:
        pool = [
            await spawn(dsn=dsn, schema=schema, smtp_url=smtp.url(), concurrency=16)
            for _ in range(workers)
        ]
        for worker in pool:
            await worker.ready()
        committed = await outbox.enqueue_emails(n, per_transaction=500)
        faults: list[Fault] = []
        for k, how in enumerate(crashes):
            target = len(smtp.messages) + n // (len(crashes) + 1)
            await smtp.wait_until(lambda t=target: len(smtp.messages) >= t, timeout=60)
            crashed_at = time.monotonic()
            faults.append(Fault(f"{how} #{k + 1}", await _crash(own_pg, outbox, how)))
            committed += await outbox.enqueue_emails(200)  # work arriving after the crash
            # The worker resumes by itself: deliveries continue without any help.
            resumed = len(smtp.messages)
            await smtp.wait_until(
                lambda r=resumed: len(smtp.messages) > r + 50, timeout=60, what="resumption"
            )
            print(f"\n{how}: deliveries resumed {time.monotonic() - crashed_at:.1f}s after it")
        await wait_until(outbox.settled, timeout=90, interval=0.1)
        report = await check_ledger(outbox, delivered(smtp), committed=committed, faults=faults)
        print(f"{len(committed)} intents through {crashes}: {report.line()}")
        assert report.counts == {"sent": len(committed)}
        for worker in pool:
            assert worker.running, worker.tail()
            assert worker.logged("database unavailable") or worker.logged("could not record")
    finally:
        await outbox.conn.close()


async def test_worker_survives_immediate_restart_and_a_killed_backend(own_pg, smtp, spawn):
    await _deliver_through_crashes(own_pg, smtp, spawn, ["restart", "backend killed"], n=3000)


@pytest.mark.timeout(300)
async def test_two_workers_survive_restarts_of_every_kind(own_pg, smtp, spawn):
    """A restart is an outage, never the end of a worker: fast and immediate restarts and a
    stop of a few seconds, twice over, with two workers delivering throughout."""
    crashes = ["fast", "immediate", "stopped"] * 2
    await _deliver_through_crashes(own_pg, smtp, spawn, crashes, n=4000, workers=2)


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_worker_survives_many_restarts(own_pg, smtp, spawn):
    crashes = ["restart", "backend killed"] * 4
    await _deliver_through_crashes(own_pg, smtp, spawn, crashes, n=10000)
