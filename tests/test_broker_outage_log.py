"""A RabbitMQ outage in the worker's log: one line when it goes down, one when it is back.

The real `outbox-worker` process, the real broker behind a TCP proxy that the test stops
(nothing listens: connections refused) and starts again. Before, aiormq logged an ERROR per
failed connect (hundreds in 20 s) on top of the sink's own lines.
"""

from __future__ import annotations

import signal
from pathlib import Path
from urllib.parse import urlsplit

import anyio

from tests.conftest import failed_at_least_once, statuses_are, wait_until
from tests.tcp_proxy import TcpProxy
from tests.test_cli import REPO, _env, worker_argv
from tests.test_sink_rabbitmq import Broker, amqp_url, broker  # noqa: F401 - fixtures
from worker.producer import enqueue
from worker.sqlfiles import Names


async def _enqueue(db, names: Names, broker: Broker, ids: range) -> None:  # noqa: F811
    async with db.transaction():
        for n in ids:
            payload = {"exchange": broker.exchange, "routing_key": "order.created", "body": n}
            await enqueue(db, "rabbitmq", payload, schema=names.schema)


async def _attempted(db, names: Names, n: int) -> bool:
    """For ``wait_until``: at least ``n`` attempts of the intents that failed at least once."""
    attempts = await db.fetchval(
        f'SELECT coalesce(sum(attempts), 0) FROM "{names.schema}".intent '
        "WHERE last_error IS NOT NULL"
    )
    return bool(attempts >= n)


async def test_an_outage_is_one_line_down_and_one_line_back(
    pg_dsn: str,
    db,
    names: Names,
    amqp_url: str,  # noqa: F811
    broker: Broker,  # noqa: F811
    tmp_path: Path,
) -> None:
    parts = urlsplit(amqp_url)
    log_file = tmp_path / "worker.log"
    async with TcpProxy("127.0.0.1", parts.port or 5672) as proxy:
        url = f"amqp://{parts.username}:{parts.password}@127.0.0.1:{proxy.port}/"
        argv = worker_argv(pg_dsn, names.schema, "--rabbitmq-url", url, "--no-dashboard")
        argv += ["--backoff-base", "0.1", "--backoff-max", "0.5", "--max-attempts", "1000"]
        with log_file.open("w") as log:
            proc = await anyio.open_process(argv, stdout=log, stderr=log, env=_env(), cwd=REPO)
            try:
                await _enqueue(db, names, broker, range(10))
                await wait_until(lambda: statuses_are(db, names, {"sent": 10}), timeout=60)
                await proxy.stop()  # the broker is down: its connection reset, port closed
                await _enqueue(db, names, broker, range(10, 60))
                await wait_until(lambda: failed_at_least_once(db, names, 50), timeout=60)
                # Many deliveries wanted the broker during the outage (50 intents retried
                # every 0.05-0.5 s): before, each one was a connect and an aiormq ERROR line.
                await wait_until(lambda: _attempted(db, names, 300), timeout=60)
                await proxy.start()
                await wait_until(lambda: statuses_are(db, names, {"sent": 60}), timeout=60)
            finally:
                proc.send_signal(signal.SIGTERM)
                with anyio.fail_after(30):
                    await proc.wait()
    lines = log_file.read_text().splitlines()
    where = f"RabbitMQ 127.0.0.1:{proxy.port}"
    down = [line for line in lines if f"{where} is down" in line]
    back = [line for line in lines if f"{where} is back after" in line]
    assert len(down) == 1 and len(back) == 1, "\n".join(lines[-40:])
    assert "WARNING" in down[0] and "reconnecting with backoff" in down[0]
    library = [line for line in lines if " aiormq." in line or " aio_pika." in line]
    assert library == []
    # Besides the per-intent retry lines (INFO), nothing is louder than those two warnings.
    loud = [line for line in lines if " WARNING " in line or " ERROR " in line]
    assert loud == down + back, "\n".join(loud)
    assert f":{parts.password}@" not in "\n".join(lines)
