"""Cumulative histograms with fixed bucket edges, as Prometheus exposes them.

Kept in ``Stats`` (no I/O, no lock: one event loop writes them) and read by /metrics at
scrape time: an observation is one bisect over 18 edges and two additions, cheaper than a
prometheus-client Histogram (a lock and a label look-up per call).
"""

from __future__ import annotations

from bisect import bisect_left

# Seconds, from a fast handler (1 ms) to a retry backlog (10 min); the last bucket is +Inf.
BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip


class Histogram:
    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # per bucket, not cumulative; the last: +Inf
        self.sum = 0.0

    def observe(self, value: float, n: int = 1) -> None:
        """``n`` observations of ``value`` (a batch delivered together)."""
        # bisect_left: a value equal to an edge belongs to that bucket (le = "<=").
        self.counts[bisect_left(BUCKETS, value)] += n
        self.sum += value * n

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, count of observations <= le)`` pairs, ending with ``+Inf``."""
        total = 0
        result = []
        for edge, count in zip((*map(repr, BUCKETS), "+Inf"), self.counts, strict=True):
            total += count
            result.append((edge, float(total)))
        return result
