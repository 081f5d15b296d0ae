"""A real Prometheus scrapes a running `outbox-worker run --http` every second while intents
are delivered, retried and turned dead; its HTTP API must then report exactly what the
intent table says happened, by kind."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
import orjson
import pytest
import yaml

from tests.conftest import statuses_are, wait_until
from tests.docs_text import doc_snippet
from tests.fault.conftest import Spawn
from tests.monitoring import Prometheus, prometheus_server, wait_for_status
from tests.tcp_proxy import free_port

# kind -> (intents, max_attempts): what each one's handler in tests/sample_handlers.py does
# decides the outcome.
PLAN = {
    "noop": (20, None),  # sent at once
    "ordered": (4, None),  # fails its first attempt as told, then sent
    "reject": (5, None),  # PermanentError: dead at once
    "boom": (3, 2),  # transient every time: retried once, then dead
    "no_such_kind": (2, None),  # no sink: dead, counted under kind="(unknown)"
}
SENT = {"noop": 20.0, "ordered": 4.0}
RETRIED = {"ordered": 4.0, "boom": 3.0}
DEAD = {"reject": 5.0, "boom": 3.0, "(unknown)": 2.0}
# Delivery attempts that reached a sink (the unknown kind never does).
ATTEMPTS = {"noop": 20.0, "ordered": 8.0, "reject": 5.0, "boom": 6.0}


async def _reports(prom: Prometheus, promql: str, label: str, expected: dict[str, float]) -> bool:
    return await prom.by_label(promql, label) == expected


async def test_prometheus_scrapes_sent_retried_dead_by_kind(
    spawn: Spawn, db: asyncpg.Connection, schema: str, names, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{free_port()}"
    worker = await spawn(
        extra=["--http", address],
        env={"OUTBOX_TEST_ATTEMPTS": str(tmp_path / "attempts.jsonl")},
    )
    await worker.ready()
    await wait_for_status(f"http://{address}/readyz", 200)
    # The documented scrape config, every second and at this worker.
    config = yaml.safe_load(
        doc_snippet("operating/monitoring.md", "Prometheus", "yaml", "# prometheus.yml").text
    )
    [job] = config["scrape_configs"]
    job.update(scrape_interval="1s", scrape_timeout="1s")
    job["static_configs"] = [{"targets": [address]}]
    async with prometheus_server(config, tmp_path) as prom:
        await wait_until(lambda: _reports(prom, "up", "job", {"outbox-worker": 1.0}), timeout=60)
        # In a few rounds, so that scrapes see the counts grow.
        for round_no in range(2):
            for kind, (n, max_attempts) in PLAN.items():
                for i in range(n // 2 + (n % 2 if round_no else 0)):
                    await db.execute(
                        f'SELECT "{schema}".enqueue($1, $2::jsonb, max_attempts => $3)',
                        kind,
                        orjson.dumps({"fail_first": kind == "ordered", "i": i}).decode(),
                        max_attempts,
                    )
            await asyncio.sleep(1.5)
        await wait_until(lambda: statuses_are(db, names, {"sent": 24, "dead": 10}), timeout=60)

        started = time.monotonic()
        for promql, label, expected in (
            ("outbox_intents_sent_total", "kind", SENT),
            ("outbox_intents_retried_total", "kind", RETRIED),
            ("outbox_intents_dead_total", "kind", DEAD),
            ("outbox_delivery_duration_seconds_count", "kind", ATTEMPTS),
            ("outbox_commit_to_sent_seconds_count", "kind", SENT),
            ('outbox_queue_intents{state="dead"}', "state", {"dead": 10.0}),
            ('outbox_queue_intents{state="due"}', "state", {"due": 0.0}),
            ("outbox_listener_connected", "job", {"outbox-worker": 1.0}),
        ):
            remaining = max(5.0, 60 - (time.monotonic() - started))
            try:
                await wait_until(lambda: _reports(prom, promql, label, expected), remaining)  # noqa: B023
            except TimeoutError:
                got = await prom.by_label(promql, label)
                pytest.fail(f"Prometheus reports {promql} = {got}, expected {expected}")
        info = await prom.query("outbox_build_info")
        assert [r["metric"]["schema"] for r in info] == [schema]
    assert worker.running
