"""The stats module: per-second windows, rates, latency percentiles, redaction. No I/O."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime

import pytest

from worker.intent import Intent
from worker.observe.stats import Stats, redact
from worker.observe.windows import WINDOW, bin_upper_edge, latency_bin, percentiles
from worker.outcome import Dead, Released, Retry, Sent
from worker.store.rows import DbHealth


class Clock:
    """Monotonic and wall clocks that move only when told."""

    def __init__(self) -> None:
        self.mono = 5000.0
        self.wall = 1_800_000_000.0

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def stats(clock: Clock) -> Stats:
    return Stats(4, clock=lambda: clock.mono, wall=lambda: clock.wall)


def intent(clock: Clock, n: int = 1, kind: str = "email", age: float = 0.0) -> Intent:
    """An intent committed ``age`` seconds ago (by the wall clock)."""
    created = datetime.fromtimestamp(clock.wall - age, UTC)
    return Intent(n, kind, {}, 1, 5, created, created)


def test_rates_count_complete_seconds_only(stats: Stats, clock: Clock):
    for _ in range(10):  # 10 sent/s for 10 s
        for _ in range(10):
            stats.on_recorded(intent(clock), Sent())
        clock.advance(1.0)
    for _ in range(25):  # the current, partial second: not in any rate yet
        stats.on_recorded(intent(clock), Sent())
    snap = stats.snapshot()
    assert snap.rate_now == pytest.approx(10.0)
    assert snap.rate_minute == pytest.approx(10.0)
    assert snap.sent == 125
    assert snap.per_second[-10:] == (10,) * 10
    assert sum(snap.per_second) == 100 and len(snap.per_second) == WINDOW


def test_rate_now_follows_the_last_seconds_and_the_minute_average_lags(stats: Stats, clock: Clock):
    for second in range(60):
        for _ in range(2 if second < 55 else 12):
            stats.on_recorded(intent(clock), Sent())
        clock.advance(1.0)
    snap = stats.snapshot()
    assert snap.rate_now == pytest.approx(12.0)
    assert snap.rate_minute == pytest.approx((55 * 2 + 5 * 12) / 60)


def test_old_seconds_leave_the_window(stats: Stats, clock: Clock):
    clock.advance(1.0)
    for _ in range(7):
        stats.on_recorded(intent(clock, age=0.2), Sent())
    stats.on_recorded(intent(clock), Retry(1.0, "try later"))
    stats.on_recorded(intent(clock), Dead("no such mailbox"))
    clock.advance(1.0)
    snap = stats.snapshot()
    assert (snap.per_second[-1], snap.retried_minute, snap.dead_minute) == (7, 1, 1)
    assert snap.latency.count == 7

    clock.advance(WINDOW + 1)
    snap = stats.snapshot()
    assert sum(snap.per_second) == 0 and snap.rate_now == 0 and snap.rate_minute == 0
    assert (snap.retried_minute, snap.dead_minute, snap.latency.count) == (0, 0, 0)
    assert snap.latency.p50 is None
    # The run's totals stay.
    assert (snap.sent, snap.retried, snap.dead) == (7, 1, 1)


def test_a_second_reused_by_the_ring_starts_empty(stats: Stats, clock: Clock):
    clock.advance(1.0)
    stats.on_recorded(intent(clock), Sent())
    clock.advance(WINDOW + 1)  # same ring position, a different second
    stats.on_recorded(intent(clock), Sent())
    clock.advance(1.0)
    assert stats.snapshot().per_second[-1] == 1


def test_no_rate_before_the_first_complete_second(stats: Stats, clock: Clock):
    stats.on_recorded(intent(clock), Sent())
    snap = stats.snapshot()
    assert snap.rate_now == 0.0 and snap.rate_minute == 0.0


def test_percentiles_are_within_one_bin_of_the_exact_values(stats: Stats, clock: Clock):
    rng = random.Random(7)
    latencies = [rng.lognormvariate(-3, 1) for _ in range(5000)]  # ~50 ms median, long tail
    for n, latency in enumerate(latencies):
        stats.on_recorded(intent(clock, n, age=latency), Sent())
    snap = stats.snapshot()
    ordered = sorted(latencies)
    for q, got in ((0.50, snap.latency.p50), (0.95, snap.latency.p95), (0.99, snap.latency.p99)):
        exact = ordered[int(q * len(ordered)) - 1]
        assert got is not None
        assert exact <= got * 1.0001 and got <= exact * 2 ** (1 / 16) * 1.0001, (q, exact, got)
    assert snap.latency.count == 5000


def test_percentiles_of_few_samples_never_exceed_the_largest():
    histogram = Counter({latency_bin(0.0123): 1})
    assert percentiles(histogram, 0.0123, (0.5, 0.99)) == [0.0123, 0.0123]
    assert percentiles(Counter(), 0.0, (0.5,)) == []


def test_latency_bins_cover_sub_millisecond_and_hours():
    assert latency_bin(0.0) == 0 and latency_bin(0.0005) == 0
    for seconds in (0.0011, 0.05, 1.0, 3600.0):
        index = latency_bin(seconds)
        assert bin_upper_edge(index - 1) < seconds <= bin_upper_edge(index) * 1.000001


def test_latency_from_a_clock_ahead_of_ours_counts_as_zero(stats: Stats, clock: Clock):
    stats.on_recorded(intent(clock, age=-3.0), Sent())  # created_at "in the future"
    assert stats.snapshot().latency.p99 == 0.0


def test_slots_show_intent_kind_and_time_on_it(stats: Stats, clock: Clock):
    stats.on_delivery_start(2, intent(clock, 42, "webhook"))
    clock.advance(1.5)
    snap = stats.snapshot()
    assert snap.busy_slots == 1
    slot = snap.slots[2]
    assert slot is not None and (slot.index, slot.intent_id, slot.kind) == (2, 42, "webhook")
    assert slot.seconds == pytest.approx(1.5)
    stats.on_delivery_end(2)
    assert stats.snapshot().slots == (None,) * 4


def test_kinds_errors_and_released(stats: Stats, clock: Clock):
    stats.on_recorded(intent(clock, 1, "email"), Sent())
    stats.on_recorded(intent(clock, 2, "email"), Retry(2.0, "451 greylisted"))
    clock.advance(1)
    stats.on_recorded(intent(clock, 3, "sms"), Dead("bad number"))
    stats.on_recorded(intent(clock, 4, "sms"), Released())
    snap = stats.snapshot()
    assert [(k.kind, k.sent, k.retried, k.dead) for k in snap.kinds] == [
        ("email", 1, 1, 0),
        ("sms", 0, 0, 1),
    ]
    assert [(e.intent_id, e.outcome, e.reason) for e in snap.errors] == [
        (3, "dead", "bad number"),  # newest first
        (2, "retry", "451 greylisted"),
    ]
    assert snap.released == 1


def test_error_reasons_are_redacted():
    assert redact("cannot reach amqp://guest:guest@mq:5672/vhost: refused") == (
        "cannot reach amqp://guest:***@mq:5672/vhost: refused"
    )
    assert redact("host=db password='a b' user=x") == "host=db password=*** user=x"
    assert redact("postgresql://u@db/x?sslmode=require&password=p%40w") == (
        "postgresql://u@db/x?sslmode=require&password=***"
    )
    assert redact("see https://example.com/a@b") == "see https://example.com/a@b"


def test_wakeup_and_database_health(stats: Stats, clock: Clock):
    stats.on_listener(True)
    stats.on_listener(False)
    stats.on_listener(True)
    stats.on_notification()
    stats.on_idle(True)
    clock.advance(2.0)
    stats.on_poll()
    health = DbHealth(1, 2, 3, 4, 10_000, 0.5, 0.0, 1, 100, 5, None, 8192, None, None, None)
    stats.on_db_health(health)
    clock.advance(0.5)
    stats.on_db_health_failed("connection refused to postgresql://app:pw@db/app")
    snap = stats.snapshot(listen=True, stopping=True)
    assert snap.listener_connected and snap.listener_reconnects == 1
    assert snap.since_notification == pytest.approx(2.5) and snap.since_poll == pytest.approx(0.5)
    assert snap.idle_declared and snap.stopping
    assert snap.db == health and snap.db_age == pytest.approx(0.5)
    assert snap.db_error == "connection refused to postgresql://app:***@db/app"
