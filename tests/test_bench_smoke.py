"""Every bench scenario at a tiny size, so the benchmarks cannot rot (CI does not run them
at full size: they take many minutes and their figures mean nothing on a shared runner)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import orjson
import pytest

from bench.__main__ import main
from bench.scenarios import SCENARIOS

# What each scenario must have measured, whatever the machine: a positive figure.
MUST_MEASURE = {
    "drain": "intents_per_s",
    "latency": "p99_ms",
    "lost-notification": "max_ms",
    "producer-cost": "commits_per_s",
    "idle": "queries_per_s",
    "email": "intents_per_s",
    "alternatives": "intents_per_s",
    "sinks": "intents_per_s",
    "ordering": "intents_per_s",
    "backlog": "rss_peak_mb",
    "http": "vs_without",
    "tracing": "vs_off",
    "xmin": "p99_ms",
}


def _run_tiny(pg_dsn: str, out: Path, scenarios: list[str], *extra: str) -> dict[str, Any]:
    """``python -m bench`` at the tiny size: results.json, after checking that each scenario
    measured its MUST_MEASURE figure; its rows are grouped by scenario under "by_scenario"."""
    args = ["--size", "tiny", "--runs", "1", "--dsn", pg_dsn, "--out", str(out), *extra]
    assert main([*scenarios, *args]) == 0
    document: dict[str, Any] = orjson.loads((out / "results.json").read_bytes())
    by_scenario: dict[str, list[dict]] = {}
    for row in document["rows"]:
        by_scenario.setdefault(row["scenario"], []).append(row)
    assert set(by_scenario) == set(scenarios)
    for scenario in scenarios:
        metric = MUST_MEASURE[scenario]
        measured = [
            r["summary"][metric]["median"] for r in by_scenario[scenario] if metric in r["summary"]
        ]
        assert measured, f"{scenario}: no row measured {metric}"
        assert all(v > 0 and not math.isnan(v) for v in measured), (scenario, measured)
    document["by_scenario"] = by_scenario
    return document


@pytest.mark.timeout(240)
def test_every_scenario_but_sinks_runs_at_a_tiny_size(pg_dsn: str, tmp_path: Path) -> None:
    pytest.importorskip("pgqueuer")
    pytest.importorskip("procrastinate")
    pytest.importorskip("matplotlib")
    assert set(MUST_MEASURE) == set(SCENARIOS)

    document = _run_tiny(pg_dsn, tmp_path, [s for s in SCENARIOS if s != "sinks"])
    assert document["meta"]["postgresql"]["fsync"] in ("on", "off")
    by_scenario = document["by_scenario"]
    systems = {r["params"].get("system") for r in by_scenario["alternatives"]}
    assert {"outbox-worker", "pgqueuer", "procrastinate"} <= systems
    # Producer cost: all three trigger variants in the same run.
    variants = {r["params"]["variant"] for r in by_scenario["producer-cost"]}
    assert variants == {"none", "always", "main"}
    # Latencies are joined per intent: every committed intent was delivered and matched.
    for row in by_scenario["latency"]:
        assert row["latency_cdf_ms"], row["label"]
    # Same-round ratios: the relay against pgqueuer, through the relay against the sink alone.
    relay_rows = [
        r for r in by_scenario["alternatives"] if r["params"]["system"] == "outbox-worker"
    ]
    assert {"vs_pgqueuer_best", "worker_us_per_intent", "p50_vs_pgqueuer"} <= {
        metric for r in relay_rows for metric in r["summary"]
    }
    targets = {t["name"]: t for t in document["targets"]}
    assert {"drain, concurrency 64", "email at concurrency 32", "idle"} <= set(targets)
    # The old relay is left out at the tiny size, and the target says why.
    assert targets["worker CPU per no-op intent"]["met"] is None
    assert "tiny" in document["meta"]["skipped"]["baseline"]
    assert document["meta"]["machine"]["fdatasync_on"]
    png = tmp_path / "latency-cdf.png"
    assert png.read_bytes().startswith(b"\x89PNG")


@pytest.mark.timeout(120)
def test_the_sinks_scenario_runs_at_a_tiny_size(
    pg_dsn: str, amqp_url: str, nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    urls = ["--rabbitmq-url", amqp_url, "--nats-url", nats_url, "--redis-url", redis_url]
    document = _run_tiny(pg_dsn, tmp_path, ["sinks"], *urls)
    relay_rows = [r for r in document["by_scenario"]["sinks"] if r["params"]["mode"] == "relay"]
    assert relay_rows and all("vs_sink_alone" in r["summary"] for r in relay_rows)
    # NATS also ran under --limits nats:concurrency=64, against the relay without, same round.
    limited = [r for r in document["by_scenario"]["sinks"] if r["params"]["mode"] == "limited"]
    assert [r["params"]["sink"] for r in limited] == ["nats"]
    assert limited[0]["summary"]["vs_relay"]["median"] > 0
    targets = {t["name"] for t in document["targets"]}
    assert "nats under --limits nats:concurrency=64" in targets
    # Kafka's drain next to the relay's no-op drain of the same round.
    assert "kafka through the relay at 64" in targets
    kafka = [r for r in relay_rows if r["params"]["sink"] == "kafka"]
    assert kafka[0]["summary"]["vs_noop_relay"]["median"] > 0
    assert "guest:guest" not in document["meta"]["command"]  # the URLs' passwords


def test_an_unknown_baseline_is_skipped_at_tiny_size_and_fatal_at_full_size() -> None:
    from bench.baseline import Unavailable, resolve

    system, why = resolve("no-such-rev-0f0f", tiny=True)
    assert system is None and "no-such-rev-0f0f" in why and "skipped" in why
    with pytest.raises(Unavailable, match="no-such-rev-0f0f"):
        resolve("no-such-rev-0f0f", tiny=False)
    assert resolve(None, tiny=True)[0] is None  # not even tried at the tiny size
