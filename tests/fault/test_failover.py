"""Failover to a standby, as managed PostgreSQL does it: a primary and a synchronous streaming
standby (throwaway clusters), workers on a multi-host DSN with
``target_session_attrs=read-write``, a producer committing all along. The primary dies
(``pg_ctl stop -m immediate``) and the standby is promoted.

In the "rejoined" variants the crashed primary comes back as a standby of the survivor (a
fresh base backup) before the promotion, so for a few seconds every host answers read-only:
asyncpg raises TargetServerAttributeNotMatched, which must count as "database unavailable".

Invariants: every worker (and one started while no host takes writes) carries on by itself
with no restart and no spin, and reconnects to the new primary, LISTEN included; every
commit the producer saw return is delivered; duplicates only for intents in flight at the
failover.
"""

from __future__ import annotations

import io
import re
import secrets
import shlex
import sys
import time
from urllib.parse import quote, urlsplit, urlunsplit

import anyio
import asyncpg
import orjson
import pytest
from rich.console import Console

from tests.conftest import wait_until
from tests.docs_text import doc_snippet
from tests.fault.ledger import Fault, Outbox, check_ledger, delivered
from tests.fault.pgcluster import SUPERUSER, SUPERUSER_PASSWORD, Cluster, streaming_pair
from tests.fault.workers import REPO, WorkerProcess, worker_env
from worker.dashboard.view import render
from worker.observe.health import COUNT_CAP, QUERY_TIMEOUT
from worker.observe.stats import Stats
from worker.settings import default_channel
from worker.store.db import create_pool
from worker.store.migrate import migrate
from worker.store.queries import Store
from worker.store.sqlfiles import Names

pytestmark = pytest.mark.timeout(300)

# How long every host stays read-only in the "rejoined" variants: longer than the lease
# (rows in flight get rescued) and long enough for a 30 s-capped backoff to have grown.
READ_ONLY_WINDOW = 8.0
_OUTAGE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.TargetServerAttributeNotMatched,  # no host takes writes
)
_CONNECTION_LOG_RE = re.compile(r"connection authorized: .*application_name=outbox-worker")


@pytest.fixture
def pair():
    with streaming_pair() as clusters:
        yield clusters


class Producer:
    """Commits email intents through the multi-host DSN all along, in small transactions.
    A commit that returned is ``acked``; a batch whose connection died before the commit
    returned may or may not have landed: its tag is kept and looked up afterwards."""

    def __init__(self, dsn: str, schema: str) -> None:
        self.dsn = dsn
        self.schema = schema
        self.acked: list[int] = []
        self.unsure: list[str] = []
        self.stopped = anyio.Event()

    async def run(self) -> None:
        conn: asyncpg.Connection | None = None
        batch = 0
        while not self.stopped.is_set():
            batch += 1
            tag = f"b{batch}-"
            try:
                if conn is None:
                    conn = await asyncpg.connect(self.dsn, timeout=5)
                self.acked += await Outbox(conn, self.schema).enqueue_emails(
                    20, per_transaction=20, tag=tag
                )
            except _OUTAGE:
                if conn is not None:  # the INSERT was sent: it may have committed
                    self.unsure.append(tag)
                    conn.terminate()
                    conn = None
                await anyio.sleep(0.2)
                continue
            await anyio.sleep(0.05)
        if conn is not None:
            await conn.close()

    async def committed(self, outbox: Outbox) -> list[int]:
        """Every id that made it: the acknowledged ones and the unsure batches that landed."""
        landed = await outbox.conn.fetch(
            f"SELECT id FROM {outbox.table} WHERE payload->>'subject' LIKE ANY($1)",
            [f"{tag}intent %" for tag in self.unsure],
        )
        return self.acked + [r["id"] for r in landed]


async def _caught_up(standby: asyncpg.Connection) -> bool:
    return bool(
        await standby.fetchval("SELECT pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn()")
    )


async def _listening_on(conn: asyncpg.Connection, workers: list[WorkerProcess]) -> bool:
    names = [f"outbox-worker listener {w.worker_id}"[:63] for w in workers]
    found = await conn.fetchval(
        "SELECT count(DISTINCT application_name) FROM pg_stat_activity "
        "WHERE application_name = ANY($1)",
        names,
    )
    return bool(found == len(names))


def _connection_attempts(clusters: tuple[Cluster, ...]) -> int:
    return sum(len(_CONNECTION_LOG_RE.findall(c.server_log())) for c in clusters)


def readme_dsn(*clusters: Cluster) -> str:
    """The multi-host DSN of docs/operating/failover.md, its hosts and login the pair's."""
    argv = shlex.split(
        doc_snippet("operating/failover.md", "Failover", "sh", "outbox-worker run").text
    )
    dsn = urlsplit(argv[argv.index("--dsn") + 1])
    assert len(dsn.netloc.split(",")) == len(clusters)
    hosts = ",".join(f"127.0.0.1:{c.port}" for c in clusters)
    login = f"{SUPERUSER}:{quote(SUPERUSER_PASSWORD, safe='')}"
    return urlunsplit((dsn.scheme, f"{login}@{hosts}", "/postgres", dsn.query, ""))


async def _server_shown(dsn: str, schema: str) -> tuple[str, str]:
    """The server the dashboard's Database line and `status --json` name."""
    pool = await create_pool(dsn, max_size=1, application_name="outbox-worker test")
    try:
        store = Store(Names(schema, default_channel(schema)))
        health = await store.db_health(pool, cap=COUNT_CAP, timeout=QUERY_TIMEOUT)
    finally:
        await pool.close()
    stats = Stats(1)
    stats.on_db_health(health)
    console = Console(file=io.StringIO(), record=True, width=200, height=30, color_system=None)
    console.print(render(stats.snapshot()))
    [line] = [ln for ln in console.export_text().splitlines() if "Database" in ln]
    status = await anyio.run_process(
        [sys.executable, "-m", "worker", "status", "--json", "--dsn", dsn, "--schema", schema],
        env=worker_env(),
        cwd=REPO,
    )
    return line, orjson.loads(status.stdout)["server"]


async def _fail_over(pair, smtp, spawn, *, rejoin: bool, listen: bool = True) -> None:
    primary, standby = pair
    dsn = readme_dsn(primary, standby)
    schema = f"t_{secrets.token_hex(5)}"
    conn = await asyncpg.connect(primary.dsn())
    await migrate(conn, Names(schema, default_channel(schema)))
    extra = [] if listen else ["--no-listen"]
    workers = [
        await spawn(dsn=dsn, schema=schema, smtp_url=smtp.url(), extra=extra) for _ in range(2)
    ]
    for worker in workers:
        await worker.ready()
    producer = Producer(dsn, schema)
    async with anyio.create_task_group() as tg:
        tg.start_soon(producer.run)
        # A backlog, so that the workers are busy (rows in flight) when the primary dies.
        producer.acked += await Outbox(conn, schema).enqueue_emails(3000, per_transaction=500)
        await smtp.wait_until(lambda: len(smtp.messages) >= 1000, timeout=60, what="deliveries")
        in_flight = await Outbox(conn, schema).processing()
        crashed_at = time.monotonic()
        await anyio.to_thread.run_sync(primary.stop, "immediate")
        await conn.close()
        # What the standby holds is what survives: rows processing there were in flight.
        conn = await asyncpg.connect(standby.dsn())
        await wait_until(lambda: _caught_up(conn), timeout=30)
        in_flight |= await Outbox(conn, schema).processing()
        await conn.close()

        if rejoin:  # the old primary back as a standby: no host takes writes
            await anyio.to_thread.run_sync(primary.base_backup_from, standby)
            await anyio.to_thread.run_sync(primary.start)
            late = await spawn(dsn=dsn, schema=schema, smtp_url=smtp.url(), extra=extra)
            for worker in [*workers, late]:
                await worker.wait_for_log("database unavailable", since=crashed_at, timeout=30)
            cpu0 = [w.cpu_seconds() for w in workers]
            tries0, t0 = _connection_attempts(pair), time.monotonic()
            await anyio.sleep(READ_ONLY_WINDOW)  # measuring an interval, not waiting
            elapsed = time.monotonic() - t0
            cpu = [w.cpu_seconds() - c for w, c in zip(workers, cpu0, strict=True)]
            tries = _connection_attempts(pair) - tries0
            print(
                f"\nno host read-write for {elapsed:.1f}s: CPU per worker "
                f"{', '.join(f'{c / elapsed:.1%}' for c in cpu)}; {tries} connection attempts "
                f"by 3 workers"
            )
            assert all(c / elapsed < 0.2 for c in cpu), cpu
            assert tries / elapsed / 3 < 10  # a spin would make hundreds per second
            assert all(w.running for w in [*workers, late]), late.tail()
            # Still waiting for a database that takes writes: the relay has not started.
            assert not late.logged(" delivery slots, schema ")
            workers.append(late)

        promoted_at = time.monotonic()
        await anyio.to_thread.run_sync(standby.promote)
        conn = await asyncpg.connect(standby.dsn())
        outbox = Outbox(conn, schema)
        resumed = len(smtp.messages)
        await smtp.wait_until(
            lambda: len(smtp.messages) > resumed + 50, timeout=60, what="resumption"
        )
        print(f"deliveries resumed {time.monotonic() - promoted_at:.1f}s after the promotion")
        new_primary = f"127.0.0.1:{standby.port} (primary)"
        dashboard, status = await _server_shown(dsn, schema)
        assert f"on {new_primary}" in dashboard and status == new_primary
        if rejoin:
            await workers[-1].ready(timeout=60)
        if listen:  # every LISTEN connection found the new primary by itself
            await wait_until(lambda: _listening_on(conn, workers), timeout=60, interval=0.2)
        # Work committed after the failover is delivered too.
        more = len(producer.acked) + 200
        await wait_until(lambda: len(producer.acked) >= more, timeout=60)
        producer.stopped.set()
    try:
        await outbox.wait_settled(timeout=90)
        committed = await producer.committed(outbox)
        report = await check_ledger(
            outbox,
            delivered(smtp),
            committed=committed,
            faults=[Fault("failover", in_flight)],
        )
        print(f"{len(committed)} intents committed ({len(producer.unsure)} batches unsure)")
        print(f"{report.line()}")
        assert report.counts == {"sent": len(committed)}
        for worker in workers:
            assert worker.running, worker.tail()  # no restart, no crash loop
            # One line when the outage starts and one when it ends, not one per retry.
            warnings = worker.logged("database unavailable", since=crashed_at)
            assert len(warnings) <= 4, [w.msg for w in warnings]
        if rejoin:
            assert workers[-1].logged("start-up: database available again after")
    finally:
        await conn.close()


async def test_failover_to_the_promoted_standby(pair, smtp, spawn):
    await _fail_over(pair, smtp, spawn, rejoin=False)


async def test_failover_while_the_old_primary_rejoins_as_a_standby(pair, smtp, spawn):
    await _fail_over(pair, smtp, spawn, rejoin=True)


async def test_failover_with_polling_only(pair, smtp, spawn):
    """No LISTEN connection whose reconnect could wake the claim loop: recovery is the claim
    loop's own doing."""
    await _fail_over(pair, smtp, spawn, rejoin=True, listen=False)
