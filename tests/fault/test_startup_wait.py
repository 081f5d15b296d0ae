"""`run` started while the database is unavailable waits for it (no exit, no restart loop
under systemd or Kubernetes); a configuration error still stops it with one line and exit
status 2."""

from __future__ import annotations

import signal

import pytest

from tests.conftest import wait_until
from tests.fault.ledger import check_ledger, delivered
from tests.fault.pgcluster import Cluster
from tests.tcp_proxy import TcpProxy


async def test_a_worker_started_while_the_database_is_down_waits_for_it(
    outbox, smtp, spawn, pg_dsn, pg_proxy: TcpProxy
):
    pg_proxy.refuse = True
    worker = await spawn(smtp_url=smtp.url(), dsn=pg_proxy.rewrite(pg_dsn))
    await worker.wait_for_log("start-up: database unavailable")
    # It keeps trying (bounded backoff) without a line per attempt.
    tried = pg_proxy.refused
    await wait_until(lambda: pg_proxy.refused >= tried + 2, timeout=30)
    assert len(worker.logged("database unavailable")) == 1, worker.tail()
    assert worker.running
    pg_proxy.refuse = False
    await worker.ready(timeout=30)
    assert worker.logged("start-up: database available again after")
    committed = await outbox.enqueue_emails(20)
    await outbox.wait_settled(timeout=30)
    await check_ledger(outbox, delivered(smtp), committed=committed)


async def test_a_stop_signal_ends_the_wait_for_the_database(smtp, spawn, pg_dsn, pg_proxy):
    pg_proxy.refuse = True
    worker = await spawn(smtp_url=smtp.url(), dsn=pg_proxy.rewrite(pg_dsn))
    await worker.wait_for_log("start-up: database unavailable")
    worker.signal(signal.SIGTERM)
    assert await worker.wait(timeout=30) == 0, worker.tail()
    assert worker.logged("SIGTERM received while waiting for the database")


@pytest.mark.parametrize(
    ("database", "error"),
    [
        ("no_such_db", 'database "no_such_db" does not exist'),
        ("postgres?target_session_attrs=read-writ", "target_session_attrs is expected"),
    ],
    ids=["unknown database", "bad DSN parameter"],
)
async def test_a_configuration_error_still_stops_the_start(
    own_pg: Cluster, smtp, spawn, database: str, error: str
):
    worker = await spawn(smtp_url=smtp.url(), dsn=own_pg.dsn(database=database), schema="outbox")
    assert await worker.wait(timeout=30) == 2, worker.tail()
    [line] = worker.output.strip().splitlines()
    assert line.startswith("outbox-worker: error: cannot connect to PostgreSQL at ")
    assert error in line
