"""Behind PgBouncer (Debian's 1.18, transaction pooling unless said otherwise), as most
production PostgreSQL runs: the worker delivers through it, with and without a direct
connection for LISTEN, when the pooler passes startup settings on silently, and while the
pooler's server connections are cut mid-stream from its admin console.

Invariant: no crash, every committed intent ends sent, and duplicates only among intents that
were ``processing`` when the connections were cut.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from urllib.parse import urlsplit

import anyio
import asyncpg
import pytest

from tests.fault.ledger import Fault, Outbox, check_ledger, delivered
from tests.pgbouncer import PgBouncer, pgbouncer
from worker.store.connection import DedicatedConnection

# Through a pooler a loaded 2-core machine can queue a heartbeat for seconds; a lease that
# lapses then is a duplicate no fault explains. The fault here is the pooler's, not the lease's.
LEASE = 15.0


@pytest.fixture(scope="module")
def bouncer(pg_dsn: str) -> Iterator[PgBouncer]:
    with pgbouncer(pg_dsn) as running:
        yield running


def _database(pg_dsn: str) -> str:
    return urlsplit(pg_dsn).path.lstrip("/") or "postgres"


async def _deliver(outbox: Outbox, smtp, worker, n: int, before=frozenset()) -> frozenset:
    """``n`` more intents, all sent once; returns every intent committed so far."""
    await worker.ready()
    committed = frozenset(before) | frozenset(await outbox.enqueue_emails(n))
    await outbox.wait_settled(timeout=120)
    report = await check_ledger(outbox, delivered(smtp), committed=committed)
    assert report.counts == {"sent": len(committed)} and report.duplicates == 0, report.line()
    assert worker.running, worker.tail()
    return committed


async def test_delivers_through_the_pooler_and_polls_without_a_listen_dsn(
    bouncer: PgBouncer, outbox: Outbox, smtp, spawn, pg_dsn: str
) -> None:
    worker = await spawn(dsn=bouncer.dsn(pg_dsn), smtp_url=smtp.url(), lease=LEASE)
    await _deliver(outbox, smtp, worker, 300)
    assert worker.logged("running as with --pooled"), worker.tail()
    assert worker.logged("behind a pooler without --listen-dsn"), worker.tail()
    assert worker.logged("poll only"), worker.tail()


async def test_a_listen_dsn_gives_the_idle_flag_a_real_backend(
    bouncer: PgBouncer, outbox: Outbox, smtp, spawn, pg_dsn: str, db: asyncpg.Connection
) -> None:
    worker = await spawn(
        dsn=bouncer.dsn(pg_dsn), smtp_url=smtp.url(), lease=LEASE, extra=["--listen-dsn", pg_dsn]
    )
    committed = await _deliver(outbox, smtp, worker, 300)
    assert worker.logged("LISTEN + poll"), worker.tail()
    # Idle, the worker asks producers to notify it: its flag names its direct LISTEN backend,
    # which the sweep keeps (a pooler's backend pid would be swept, and producers would stop
    # notifying).
    with anyio.fail_after(30):
        while True:
            pid = await db.fetchval(f"SELECT backend_pid FROM {outbox.schema}.idle_worker LIMIT 1")
            listening = pid and await db.fetchval(
                "SELECT application_name LIKE 'outbox-worker listener%' FROM pg_stat_activity"
                " WHERE pid = $1",
                pid,
            )
            if listening:
                break
            await anyio.sleep(0.1)
    await _deliver(outbox, smtp, worker, 50, committed)  # picked up after a notification


async def test_a_pooler_that_passes_settings_on_is_found_by_the_statements(
    pg_dsn: str, outbox: Outbox, smtp, spawn
) -> None:
    """``ignore_startup_parameters = enable_sort``: the start-up probe sees nothing, the first
    named statement that vanishes (or collides) gives the pooler away; the worker switches that
    connection to unnamed statements and runs the statement again, once."""
    with pgbouncer(pg_dsn, ignore_startup_parameters="enable_sort") as quiet:
        worker = await spawn(
            dsn=quiet.dsn(pg_dsn), smtp_url=smtp.url(), lease=LEASE, extra=["--no-listen"]
        )
        committed = await _deliver(outbox, smtp, worker, 500)
        await _deliver(outbox, smtp, worker, 500, committed)
        assert worker.logged("goes through a pooler"), worker.tail()


async def test_server_connections_cut_mid_stream(
    bouncer: PgBouncer, outbox: Outbox, smtp, spawn, pg_dsn: str
) -> None:
    """RECONNECT (server connections closed once released) and KILL (every client and server
    connection of the database dropped at once), each during a drain of two workers."""
    database = _database(pg_dsn)
    workers = [
        await spawn(dsn=bouncer.dsn(pg_dsn), smtp_url=smtp.url(), lease=LEASE, concurrency=16)
        for _ in range(2)
    ]
    for worker in workers:
        await worker.ready()
    committed = await outbox.enqueue_emails(3000, per_transaction=500)
    faults: list[Fault] = []
    for k, command in enumerate((f"RECONNECT {database}", f"KILL {database}")):
        target = len(smtp.messages) + 800
        await smtp.wait_until(lambda t=target: len(smtp.messages) >= t, timeout=60)
        before = await outbox.processing()
        await bouncer.admin(command)
        if command.startswith("KILL"):
            await bouncer.admin(f"RESUME {database}")
        faults.append(Fault(f"{command} #{k + 1}", before | await outbox.processing()))
        resumed = len(smtp.messages)
        await smtp.wait_until(
            lambda r=resumed: len(smtp.messages) > r + 50, timeout=60, what="resumption"
        )
    await outbox.wait_settled(timeout=120)
    report = await check_ledger(outbox, delivered(smtp), committed=committed, faults=faults)
    print(f"\n{len(committed)} intents through RECONNECT and KILL: {report.line()}")
    assert report.counts == {"sent": len(committed)}
    for worker in workers:
        assert worker.running, worker.tail()


def test_operator_commands_through_the_pooler_twice(bouncer: PgBouncer, pg_dsn: str, schema: str):
    """Each run of migrate, status and enqueue is a new connection that lands on a server
    connection an earlier one prepared statements on: unnamed statements only."""
    dsn = bouncer.dsn(pg_dsn)
    env = {**os.environ, "CI": os.environ.get("CI", "")}

    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "worker", *args, "--dsn", dsn, "--schema", schema],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout + done.stderr

    for n in (1, 2):
        cli("migrate")
        cli("enqueue", "email", '{"to": "a@example.com", "subject": "s", "text": "t"}')
        table = cli("status")
        row = next(line for line in table.splitlines() if " email " in line)
        cells = [cell.strip() for cell in row.strip("│ ").split("│")]
        assert cells[:2] == ["email", str(n)], table  # kind, pending


async def test_session_pooling_is_a_pooler_too(pg_dsn: str, outbox: Outbox, smtp, spawn) -> None:
    with pgbouncer(pg_dsn, "session") as session:
        worker = await spawn(dsn=session.dsn(pg_dsn), smtp_url=smtp.url(), lease=LEASE)
        await _deliver(outbox, smtp, worker, 200)
        assert worker.logged("running as with --pooled"), worker.tail()


async def test_pooled_settings_last_one_transaction(bouncer: PgBouncer, pg_dsn: str) -> None:
    """The claim loop's planner setting holds for its statement and leaves nothing behind on
    the server connection the next client gets."""
    conn = DedicatedConnection(
        bouncer.dsn(pg_dsn), "pooled test", {"enable_sort": "off"}, pooled=True
    )
    try:
        for _ in range(3):
            assert await conn.fetchval("SELECT current_setting('enable_sort')") == "off"
    finally:
        await conn.close()
    other = await asyncpg.connect(bouncer.dsn(pg_dsn), statement_cache_size=0)
    try:
        for _ in range(3):
            assert await other.fetchval("SELECT current_setting('enable_sort')") == "on"
    finally:
        await other.close()
