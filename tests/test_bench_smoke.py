"""Every bench scenario at a tiny size, so the benchmarks cannot rot (CI does not run them
at full size: they take many minutes and their figures mean nothing on a shared runner)."""

from __future__ import annotations

import math
from pathlib import Path

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
}


@pytest.mark.timeout(240)
def test_every_scenario_runs_at_a_tiny_size(pg_dsn: str, tmp_path: Path) -> None:
    pytest.importorskip("pgqueuer")
    pytest.importorskip("procrastinate")
    pytest.importorskip("matplotlib")
    assert set(MUST_MEASURE) == set(SCENARIOS)

    assert main(["--size", "tiny", "--runs", "1", "--dsn", pg_dsn, "--out", str(tmp_path)]) == 0

    document = orjson.loads((tmp_path / "results.json").read_bytes())
    assert document["meta"]["postgresql"]["fsync"] in ("on", "off")
    by_scenario: dict[str, list[dict]] = {}
    for row in document["rows"]:
        by_scenario.setdefault(row["scenario"], []).append(row)
    assert set(by_scenario) == set(SCENARIOS)
    for scenario, metric in MUST_MEASURE.items():
        measured = [
            r["summary"][metric]["median"] for r in by_scenario[scenario] if metric in r["summary"]
        ]
        assert measured, f"{scenario}: no row measured {metric}"
        assert all(v > 0 and not math.isnan(v) for v in measured), (scenario, measured)
    systems = {r["params"].get("system") for r in by_scenario["alternatives"]}
    assert {"outbox-worker", "pgqueuer", "procrastinate"} <= systems
    # Producer cost: all three trigger variants in the same run.
    variants = {r["params"]["variant"] for r in by_scenario["producer-cost"]}
    assert variants == {"none", "always", "main"}
    # Latencies are joined per intent: every committed intent was delivered and matched.
    for row in by_scenario["latency"]:
        assert row["latency_cdf_ms"], row["label"]
    assert {t["name"] for t in document["targets"]} >= {"idle", "lost notification"}
    png = tmp_path / "latency-cdf.png"
    assert png.read_bytes().startswith(b"\x89PNG")
