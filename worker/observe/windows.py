"""The last minute, second by second, and a latency histogram: pure data structures for
``worker.observe.stats``. Each hook touches one bucket (O(1) at any rate); reading a window walks
at most ``WINDOW`` buckets."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

WINDOW = 60  # seconds covered by the sparkline, the per-minute rates and the percentiles

# Latency histogram: bin edges at 1 ms * 2**(k/16), i.e. each bin 4.4% wide. Reported
# percentiles are bin upper edges (capped at the largest sample), so at most 4.4% high.
_BIN_FLOOR = 0.001
_BINS_PER_DOUBLING = 16


def latency_bin(seconds: float) -> int:
    if seconds <= _BIN_FLOOR:
        return 0
    return math.ceil(math.log2(seconds / _BIN_FLOOR) * _BINS_PER_DOUBLING)


def bin_upper_edge(index: int) -> float:
    return float(_BIN_FLOOR * 2 ** (index / _BINS_PER_DOUBLING))


@dataclass(slots=True)
class _Second:
    """What happened during one second of the monotonic clock."""

    second: int
    sent: int = 0
    retried: int = 0
    dead: int = 0
    latency: Counter[int] = field(default_factory=Counter)
    latency_max: float = 0.0

    def reset(self, second: int) -> None:
        self.second = second
        self.sent = self.retried = self.dead = 0
        self.latency.clear()
        self.latency_max = 0.0


class SecondBuckets:
    """A ring of per-second buckets covering the last ``span`` seconds."""

    def __init__(self, span: int = WINDOW) -> None:
        self._ring = [_Second(-1) for _ in range(span + 1)]

    def at(self, now: float) -> _Second:
        second = math.floor(now)
        bucket = self._ring[second % len(self._ring)]
        if bucket.second != second:
            bucket.reset(second)
        return bucket

    def between(self, first: int, last: int) -> Iterator[_Second | None]:
        """Seconds ``first``..``last`` inclusive, oldest first; None for a second with nothing."""
        for second in range(first, last + 1):
            bucket = self._ring[second % len(self._ring)]
            yield bucket if bucket.second == second else None


@dataclass(frozen=True, slots=True)
class Latency:
    """Commit (created_at) to recorded as sent, over the last ``WINDOW`` seconds."""

    count: int
    p50: float | None
    p95: float | None
    p99: float | None


def percentiles(histogram: Counter[int], largest: float, qs: tuple[float, ...]) -> list[float]:
    """Nearest-rank percentiles of a latency histogram (bin upper edges, capped at ``largest``)."""
    total = sum(histogram.values())
    if total == 0:
        return []
    result: list[float] = []
    ranks = [max(1, math.ceil(q * total)) for q in qs]
    seen = 0
    pending = iter(ranks)
    rank = next(pending)
    for index in sorted(histogram):
        seen += histogram[index]
        while seen >= rank:
            result.append(min(bin_upper_edge(index), largest))
            try:
                rank = next(pending)
            except StopIteration:
                return result
    return result
