"""/readyz and /healthz of a real `outbox-worker run --http` subprocess: readiness follows
the database (cut by the test TCP proxy, then back) and turns 503 as soon as a graceful
stop begins, before the process exits; /metrics never shows the DSN's password."""

from __future__ import annotations

import signal
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson

from tests.conftest import wait_until
from tests.fault.conftest import Spawn
from tests.monitoring import http_get, wait_for_status
from tests.tcp_proxy import TcpProxy, free_port

PASSWORD = "pr0be-s3cret-pw"


def with_password(dsn: str, password: str) -> str:
    """The DSN with ``password`` as its userinfo (the shared server trusts, so any works)."""
    parts = urlsplit(dsn)
    netloc = f"{parts.username or 'postgres'}:{password}@{parts.hostname}:{parts.port or 5432}"
    return urlunsplit(parts._replace(netloc=netloc))


async def test_readyz_follows_the_database_and_metrics_hide_the_password(
    spawn: Spawn, db: asyncpg.Connection, pg_proxy: TcpProxy, pg_dsn: str
) -> None:
    address = f"127.0.0.1:{free_port()}"
    base = f"http://{address}"
    worker = await spawn(
        dsn=pg_proxy.rewrite(with_password(pg_dsn, PASSWORD)), extra=["--http", address]
    )
    await worker.ready()
    assert await wait_for_status(f"{base}/readyz", 200) == "ready\n"
    assert await http_get(f"{base}/healthz") == (200, "ok\n")

    await pg_proxy.stop()  # the database is unreachable: refused, every connection reset
    reason = await wait_for_status(f"{base}/readyz", 503)
    assert reason.startswith("database unreachable"), reason
    assert reason.count("\n") == 1, reason  # one line
    # Liveness is the event loop, not the database: no restart for a database outage.
    assert await http_get(f"{base}/healthz") == (200, "ok\n")
    status, metrics = await http_get(f"{base}/metrics")
    assert status == 200
    assert "outbox_database_up 0.0" in metrics

    await pg_proxy.start()
    await wait_for_status(f"{base}/readyz", 200)
    status, metrics = await http_get(f"{base}/metrics")
    assert status == 200 and "outbox_database_up 1.0" in metrics
    # The scrape during the outage could not read the queue gauges, and counted it.
    health_errors = next(
        line for line in metrics.splitlines()
        if line.startswith('outbox_database_errors_total{operation="health"}')
    )  # fmt: skip
    assert float(health_errors.split()[-1]) >= 1, health_errors
    assert PASSWORD not in metrics + reason + worker.output


async def test_readyz_is_503_during_a_graceful_stop(
    spawn: Spawn, db: asyncpg.Connection, schema: str
) -> None:
    address = f"127.0.0.1:{free_port()}"
    base = f"http://{address}"
    worker = await spawn(grace=30.0, extra=["--http", address])
    await worker.ready()
    await wait_for_status(f"{base}/readyz", 200)
    await db.execute(
        f'SELECT "{schema}".enqueue($1, $2::jsonb)', "slow", orjson.dumps({"seconds": 4}).decode()
    )

    async def delivering() -> bool:
        _, metrics = await http_get(f"{base}/metrics")
        return "outbox_delivery_slots_busy 1.0" in metrics

    await wait_until(delivering, timeout=20)
    worker.signal(signal.SIGTERM)
    reason = await wait_for_status(f"{base}/readyz", 503, timeout=10)
    assert reason.startswith("stopping"), reason
    assert worker.running  # still finishing its delivery: not ready, but alive
    assert await http_get(f"{base}/healthz") == (200, "ok\n")
    assert await worker.wait(timeout=30) == 0
    assert await db.fetchval(f'SELECT status FROM "{schema}".intent') == "sent"
    status, _ = await http_get(f"{base}/readyz")
    assert status == 0  # the port is closed once the worker has exited
