"""What every scenario gets: where the server is, how big to go, how many runs."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import asyncpg

if TYPE_CHECKING:
    from bench.systems import System


@dataclass(frozen=True)
class Size:
    """Every knob that makes a scenario long or short. ``FULL`` is what docs/performance.md reports;
    ``TINY`` is what the smoke test runs."""

    drain_intents: int = 20_000
    # (concurrency, batch size): a claim takes at most min(idle slots, batch size) rows.
    drain_grid: tuple[tuple[int, int], ...] = ((10, 10), (100, 100), (1000, 100), (1000, 1000))
    bare_batches: tuple[int, ...] = (1000,)
    latency_rates: tuple[int, ...] = (100, 1000)
    latency_seconds: float = 10.0
    latency_producers: int = 4
    # Rates tried upwards (one run each) for "the highest rate the relay keeps up with".
    max_rate_steps: tuple[int, ...] = (2000, 3000, 4000, 5000, 6000, 8000)
    max_rate_seconds: float = 5.0
    keep_up_p99_ms: float = 100.0
    lost_samples: int = 3
    lost_poll_interval: float = 1.0
    producer_counts: tuple[int, ...] = (1, 4, 16)
    producer_seconds: float = 5.0
    producer_runs_at_least: int = 5  # the hard target, on a noisy machine: more runs
    idle_seconds: float = 12.0
    idle_poll_interval: float = 2.0
    email_intents: int = 1000
    email_concurrency: tuple[int, ...] = (1, 8, 32)  # the target is at 32
    sink_intents: int = 5000
    sink_concurrency: tuple[int, ...] = (8, 32, 64)  # the target is at 64
    pgqueuer_intents: int = 20_000
    pgqueuer_batches: tuple[int, ...] = (10, 100, 1000)
    procrastinate_intents: int = 2000
    procrastinate_concurrency: tuple[int, ...] = (10, 50)
    alt_latency_rate: int = 1000
    # pgqueuer's insert trigger notifies on every enqueue, so its producers need more
    # connections to offer 1,000/s at all; every system gets the same number.
    alt_latency_producers: int = 16
    ordering_keys: int = 1000  # the drain over keys (the target: >= 0.7x unordered)
    ordering_one_key_intents: int = 2000
    ordering_rate: int = 1000
    ordering_latency_keys: int = 100
    # The big backlog (issue 14): the relay was down for a day.
    backlog_pending: int = 1_000_000
    backlog_sent: int = 1_000_000
    backlog_concurrency: int = 64
    backlog_producers: int = 4
    backlog_producer_seconds: float = 5.0
    backlog_runs_at_most: int = 1  # a run takes minutes: once, unless --runs asks fewer
    http_intents: int = 100_000  # long enough for a few 1 s scrapes at full speed
    # A held xmin horizon (issue 21): producers at this rate for this long, figures per window.
    xmin_rate: int = 300
    xmin_seconds: float = 300.0
    xmin_window: float = 30.0
    xmin_runs_at_most: int = 1  # five minutes a run


FULL = Size()
TINY = Size(
    drain_intents=300,
    drain_grid=((10, 10), (100, 100)),
    bare_batches=(100,),
    latency_rates=(100,),
    latency_seconds=0.5,
    latency_producers=2,
    max_rate_steps=(200,),
    max_rate_seconds=0.5,
    keep_up_p99_ms=1000.0,
    lost_samples=1,
    lost_poll_interval=0.5,
    producer_counts=(1, 4),
    producer_seconds=0.3,
    producer_runs_at_least=1,
    idle_seconds=1.0,
    idle_poll_interval=0.25,
    email_intents=40,
    email_concurrency=(1, 32),
    sink_intents=200,
    sink_concurrency=(64,),
    http_intents=300,
    pgqueuer_intents=200,
    pgqueuer_batches=(10,),
    ordering_keys=30,
    ordering_one_key_intents=50,
    ordering_rate=100,
    ordering_latency_keys=10,
    backlog_pending=2000,
    backlog_sent=2000,
    backlog_producers=2,
    backlog_producer_seconds=0.3,
    procrastinate_intents=30,
    procrastinate_concurrency=(10,),
    alt_latency_rate=50,
    alt_latency_producers=2,
    xmin_rate=100,
    xmin_seconds=2.0,
    xmin_window=1.0,
)
SIZES = {"full": FULL, "tiny": TINY}


@dataclass
class Context:
    dsn: str
    size: Size
    runs: int
    log_dir: Path
    progress: Callable[[str], None] = field(default=lambda _msg: None)
    # The old relay (bench/baseline.py) the alternatives scenario measures alongside, if any.
    baseline: System | None = None
    # Parts of the run left out, and why in one line ("baseline", "sinks"): for the targets.
    skipped: dict[str, str] = field(default_factory=dict)
    # The brokers of the sinks scenario, "rabbitmq" and "nats" (default: bench.sinks.URLS).
    broker_urls: dict[str, str] = field(default_factory=dict)
    # The sinks scenario's kinds that also run under --limits KIND:concurrency=C.
    limited_sinks: tuple[str, ...] = ("nats",)

    @contextlib.asynccontextmanager
    async def admin(self) -> AsyncIterator[asyncpg.Connection]:
        """A plain connection for seeding, polling and CPU bookkeeping."""
        conn = await asyncpg.connect(self.dsn)
        try:
            yield conn
        finally:
            await conn.close()


async def wait_until_false(conn: asyncpg.Connection, sql: str, timeout: float) -> float:
    """Poll ``sql`` (a boolean) every 2 ms until it is false; the monotonic time it was seen
    false. Only used at the tail of a drain, after the worker reports the last handler."""
    import time

    with anyio.fail_after(timeout):
        while await conn.fetchval(sql):  # noqa: ASYNC110 - the state is in the database
            await anyio.sleep(0.002)
    return time.monotonic()
