"""`--http` start-up errors (one line, exit 2), the pieces /metrics is built from (the Stats
histograms and counters), and the collector's bounded labels, against a relay in process."""

from __future__ import annotations

import socket
import sys
from datetime import UTC, datetime

import asyncpg
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Recorder, RelayFactory, wait_until
from tests.test_cli import cli
from worker.errors import ConfigError, PermanentError
from worker.intent import Intent
from worker.observe.histogram import BUCKETS, Histogram
from worker.observe.http_server import host_port, require_extra
from worker.observe.metrics import UNKNOWN_KIND, relay_registry
from worker.observe.stats import Stats
from worker.outcome import Released


@pytest.mark.parametrize("bad", ["9187", "localhost", ":9187", "host:0", "host:70000", "h:x"])
def test_http_address_must_be_host_and_port(bad: str) -> None:
    with pytest.raises(ValueError):
        host_port(bad)


def test_a_bad_http_flag_or_variable_is_one_line() -> None:
    result = cli("run", "--http", "9187", "--dsn", "postgresql://x@127.0.0.1:1/x")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--http: expected a HOST:PORT such as 127.0.0.1:9187, got '9187'" in result.stderr
    result = cli("run", "--dsn", "postgresql://x@127.0.0.1:1/x", env={"OUTBOX_HTTP": "nope"})
    assert result.returncode == 2
    assert "OUTBOX_HTTP: expected a HOST:PORT such as 127.0.0.1:9187, got 'nope'" in result.stderr


def test_a_port_in_use_is_one_line(pg_dsn: str, db: asyncpg.Connection, schema: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        result = cli("run", "--dsn", pg_dsn, "--schema", schema, "--http", address)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"outbox-worker: error: --http {address}: cannot listen")
    assert "Traceback" not in result.stderr


def test_without_the_extra_http_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'pg-outbox-relay\[metrics\]'"):
        require_extra()


def test_histogram_buckets_are_cumulative_with_le_inclusive() -> None:
    hist = Histogram()
    hist.observe(0.001)  # on an edge: in that bucket (le means <=)
    hist.observe(0.0011)
    hist.observe(45.0, n=3)  # a batch of three that took 45 s
    hist.observe(7200.0)  # beyond the last edge: +Inf only
    buckets = dict(hist.cumulative())
    assert buckets["0.001"] == 1 and buckets["0.0025"] == 2
    assert buckets["30.0"] == 2 and buckets["60.0"] == 5 and buckets["600.0"] == 5
    assert buckets["+Inf"] == 6 and len(buckets) == len(BUCKETS) + 1
    assert hist.sum == pytest.approx(0.001 + 0.0011 + 135.0 + 7200.0)


def test_stats_count_what_metrics_need() -> None:
    now = [100.0]
    stats = Stats(2, clock=lambda: now[0], timings=True)
    created = datetime.now(UTC)
    email = Intent(1, "email", {}, 1, 5, created, created)
    stats.on_delivery_start(0, email)
    now[0] += 0.2
    stats.on_delivery_end(0, n=4)  # a batch sink's call: four intents, 0.2 s each
    stats.on_recorded(email, Released())
    stats.on_claim(3)
    stats.on_poll()
    stats.on_rescued(2)
    stats.on_db_error("claim")
    stats.on_db_health_failed("connection refused")
    assert sum(stats.delivery_seconds["email"].counts) == 4
    assert stats.delivery_seconds["email"].sum == pytest.approx(0.8)
    assert stats.released == {"email": 1} and stats.snapshot().released == 1
    assert (stats.claims, stats.claimed, stats.polls, stats.lease_rescues) == (1, 3, 1, 2)
    assert stats.db_errors == {"claim": 1, "health": 1}


async def test_metrics_fold_kinds_without_a_sink_into_one_label(
    start_relay: RelayFactory, db: asyncpg.Connection, schema: str
) -> None:
    async def reject(_intent: Intent) -> None:
        raise PermanentError("no")

    async with start_relay({"ok": Recorder(), "bad": reject}) as relay:
        for kind in ("ok", "bad", "typo-1", "typo-2", "typo-3"):
            await db.execute(f'SELECT "{schema}".enqueue($1, $2::jsonb)', kind, "{}")
        await wait_until(lambda: sum(relay.stats.dead.values()) == 4)
        await wait_until(lambda: relay.stats.sent["ok"] == 1)
        text = generate_latest(relay_registry(relay, ["ok", "bad"])).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    dead = {s.labels["kind"]: s.value for s in families["outbox_intents_dead"].samples
            if s.name.endswith("_total")}  # fmt: skip
    assert dead == {"bad": 1.0, UNKNOWN_KIND: 3.0}
    assert "typo" not in text
    assert families["outbox_delivery_slots"].samples[0].value == relay.settings.concurrency
