"""`python -m bench.sinks` at a tiny size, so the sink benchmark cannot rot."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from bench.sinks import main


@pytest.mark.timeout(120)
def test_sink_bench_runs_at_a_tiny_size(pg_dsn: str, tmp_path: Path) -> None:
    out = tmp_path / "sinks.json"
    args = ["--intents", "40", "--runs", "1", "--concurrency", "4", "--dsn", pg_dsn]
    assert main([*args, "--json", str(out)]) == 0
    rows = orjson.loads(out.read_bytes())["rows"]
    sinks = ("noop", "webhook", "rabbitmq", "nats", "sidekiq", "celery-amqp", "celery-redis",
             "sqs", "sqs-fifo")  # fmt: skip
    assert {(r["sink"], r["mode"]) for r in rows} == {
        (sink, mode) for sink in sinks for mode in ("sink", "relay")
    }
    assert all(r["median"] > 0 for r in rows)
