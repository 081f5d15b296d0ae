"""A broker outage in the worker's log: one line when it goes down, one when it is back.

The real `outbox-worker` process, the real broker (RabbitMQ, NATS) behind a TCP proxy that
the test stops (its connections reset, nothing listens: connections refused) and starts
again while intents keep wanting the broker. Before, aiormq logged an ERROR per failed
connect (178 in 20 s with 100 intents) on top of the sink's own lines.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio

from tests.conftest import failed_at_least_once, statuses_are, wait_until
from tests.tcp_proxy import TcpProxy
from tests.test_cli import REPO, _env, worker_argv
from tests.test_sink_nats import Stream, stream  # noqa: F401 - fixtures
from tests.test_sink_rabbitmq import Broker, broker  # noqa: F401 - fixtures
from worker.producer import enqueue
from worker.store.sqlfiles import Names

Payload = Callable[[int], dict[str, Any]]


async def _attempted(db, names: Names, n: int) -> bool:
    """For ``wait_until``: at least ``n`` attempts of the intents that failed at least once."""
    attempts = await db.fetchval(
        f'SELECT coalesce(sum(attempts), 0) FROM "{names.schema}".intent '
        "WHERE last_error IS NOT NULL"
    )
    return bool(attempts >= n)


async def _outage(
    pg_dsn: str,
    db,
    names: Names,
    log_file: Path,
    url: str,
    kind: str,
    payload: Payload,
    *extra: str,
) -> tuple[list[str], str]:
    """Run the worker with ``--{kind}-url`` through a proxy; deliver 10 intents, stop the
    proxy, enqueue 50 more and let them fail 200 times, start it again, wait until all are
    sent; then stop the worker (exit status 0). -> the worker's log lines and the proxy's
    host:port."""
    parts = urlsplit(url)
    async with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 0) as proxy:
        argv = worker_argv(pg_dsn, names.schema, f"--{kind}-url", proxy.rewrite(url))
        argv += ["--no-dashboard", "--backoff-base", "0.1", "--backoff-max", "0.5"]
        argv += ["--max-attempts", "1000", *extra]

        async def add(ids: range) -> None:
            async with db.transaction():
                for n in ids:
                    await enqueue(db, kind, payload(n), schema=names.schema)

        with log_file.open("w") as log:
            proc = await anyio.open_process(argv, stdout=log, stderr=log, env=_env(), cwd=REPO)
            try:
                await add(range(10))
                await wait_until(lambda: statuses_are(db, names, {"sent": 10}), timeout=60)
                await proxy.stop()  # the broker is down: its connection reset, port closed
                await add(range(10, 60))
                await wait_until(lambda: failed_at_least_once(db, names, 50), timeout=60)
                # Many deliveries wanted the broker during the outage (50 intents retried
                # every 0.05-0.5 s): before, each one was a connect and an ERROR line.
                await wait_until(lambda: _attempted(db, names, 200), timeout=90)
                await proxy.start()
                await wait_until(lambda: statuses_are(db, names, {"sent": 60}), timeout=60)
            finally:
                proc.send_signal(signal.SIGTERM)
                with anyio.fail_after(30):
                    await proc.wait()
    assert proc.returncode == 0
    lines = (await anyio.Path(log_file).read_text()).splitlines()
    return lines, f"{proxy.host}:{proxy.port}"


def _assert_one_line_each(lines: list[str], where: str, libraries: tuple[str, ...]) -> None:
    down = [line for line in lines if f"{where} is down" in line]
    back = [line for line in lines if f"{where} is back after" in line]
    assert len(down) == 1 and len(back) == 1, "\n".join(lines[-40:])
    assert " WARNING " in down[0] and "intents are retried meanwhile" in down[0]
    assert [line for line in lines if any(f" {lib}" in line for lib in libraries)] == []
    # Besides the per-intent retry lines (INFO) and the start-up check (no SMTP server here),
    # nothing is louder than those two.
    loud = [
        line
        for line in lines
        if (" WARNING " in line or " ERROR " in line) and " outbox.targets: " not in line
    ]
    assert loud == down + back, "\n".join(loud)


async def test_a_rabbitmq_outage_is_one_line_down_and_one_line_back(
    pg_dsn: str,
    db,
    names: Names,
    amqp_url: str,
    broker: Broker,  # noqa: F811
    tmp_path: Path,
) -> None:
    def payload(n: int) -> dict[str, Any]:
        return {"exchange": broker.exchange, "routing_key": "order.created", "body": n}

    lines, where = await _outage(
        pg_dsn, db, names, tmp_path / "worker.log", amqp_url, "rabbitmq", payload
    )
    _assert_one_line_each(lines, f"RabbitMQ {where}", ("aiormq.", "aio_pika."))
    password = urlsplit(amqp_url).password
    assert password is None or f":{password}@" not in "\n".join(lines)


async def test_a_nats_outage_is_one_line_down_and_one_line_back(
    pg_dsn: str,
    db,
    names: Names,
    nats_url: str,
    stream: Stream,  # noqa: F811
    tmp_path: Path,
) -> None:
    def payload(n: int) -> dict[str, Any]:
        return {"subject": f"{stream.prefix}.orders", "body": n}

    # A publish while the client reconnects waits for its PubAck: fail it after 1 s.
    lines, where = await _outage(
        pg_dsn, db, names, tmp_path / "worker.log", nats_url, "nats", payload, "--limits",
        "nats:timeout=1",
    )  # fmt: skip
    _assert_one_line_each(lines, f"NATS {where}", ("nats.",))


async def test_the_worker_stops_cleanly_while_nats_is_down(
    pg_dsn: str,
    db,
    names: Names,
    nats_url: str,
    stream: Stream,  # noqa: F811
    tmp_path: Path,
) -> None:
    """SIGTERM during an outage: nats-py's close raised RuntimeError on the dead transport
    (under uvloop), a traceback and exit status 1."""
    parts = urlsplit(nats_url)
    log_file = anyio.Path(tmp_path / "worker.log")
    async with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 4222) as proxy:
        argv = worker_argv(pg_dsn, names.schema, "--nats-url", proxy.rewrite(nats_url))
        with (tmp_path / "worker.log").open("w") as log:
            proc = await anyio.open_process(argv, stdout=log, stderr=log, env=_env(), cwd=REPO)
            try:
                await enqueue(db, "nats", {"subject": f"{stream.prefix}.x"}, schema=names.schema)
                await wait_until(lambda: statuses_are(db, names, {"sent": 1}), timeout=60)
                await proxy.stop()
                await wait_until(lambda: _logged(log_file, "is down"), timeout=60)
                async with db.transaction():  # deliveries in flight while it reconnects
                    for _ in range(20):
                        payload = {"subject": f"{stream.prefix}.x"}
                        await enqueue(db, "nats", payload, schema=names.schema)
                await wait_until(lambda: _count(db, names, "processing", 8), timeout=60)
            finally:
                proc.send_signal(signal.SIGTERM)
                with anyio.fail_after(30):
                    await proc.wait()
    output = await log_file.read_text()
    assert proc.returncode == 0 and "Traceback" not in output, output


async def _logged(log_file: anyio.Path, text: str) -> bool:
    return text in await log_file.read_text()


async def _count(db, names: Names, status: str, n: int) -> bool:
    got = await db.fetchval(
        f'SELECT count(*) FROM "{names.schema}".intent WHERE status = $1', status
    )
    return bool(got >= n)
