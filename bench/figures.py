"""Pure arithmetic on measurements: percentiles, and the median/min/max of repeated runs."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values (p in 0..100)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_figures(latencies_s: Iterable[float]) -> dict[str, float]:
    """p50/p95/p99/max in milliseconds."""
    values = sorted(v * 1000 for v in latencies_s)
    return {
        "p50_ms": percentile(values, 50),
        "p95_ms": percentile(values, 95),
        "p99_ms": percentile(values, 99),
        "max_ms": values[-1] if values else math.nan,
    }


def latencies(commits: Mapping[int, float], starts: Mapping[int, float]) -> list[float]:
    """Handler start minus commit, per intent key; keys missing either side are skipped."""
    return [starts[k] - t for k, t in commits.items() if k in starts]


@dataclass
class Row:
    """One line of a result table: the same configuration measured in several runs."""

    scenario: str
    label: str
    params: dict[str, Any] = field(default_factory=dict)
    runs: list[dict[str, float]] = field(default_factory=list)
    samples_ms: list[float] = field(default_factory=list)  # pooled latencies, for the CDF
    notes: dict[str, Any] = field(default_factory=dict)

    def add(self, figures: Mapping[str, float]) -> None:
        self.runs.append(dict(figures))

    def summary(self) -> dict[str, dict[str, float]]:
        """metric -> {median, min, max} over the runs."""
        out: dict[str, dict[str, float]] = {}
        for metric in self.runs[0] if self.runs else {}:
            values = [r[metric] for r in self.runs if metric in r and not math.isnan(r[metric])]
            if values:
                out[metric] = {
                    "median": statistics.median(values),
                    "min": min(values),
                    "max": max(values),
                }
        return out

    def median(self, metric: str) -> float:
        return self.summary().get(metric, {}).get("median", math.nan)

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "label": self.label,
            "params": self.params,
            "runs": self.runs,
            "summary": self.summary(),
            "notes": self.notes,
        }
