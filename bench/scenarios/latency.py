"""2. End-to-end latency under steady load: commit -> handler start, NOTIFY vs poll only."""

from __future__ import annotations

from bench.context import Context
from bench.drive import keeps_up, stream_once
from bench.figures import Row
from bench.systems import RelaySystem

TITLE = "End-to-end latency, steady load (producer commit -> handler start)"
METRICS = ("achieved_per_s", "p50_ms", "p95_ms", "p99_ms", "max_ms")
POLL_INTERVAL = 2.0  # the relay's default
# A claim takes at most as many rows as there are idle slots: the default 8 slots cap a
# worker near 3,000 intents/s, so the search for the highest rate uses a drain-sized pool.
MAX_RATE_CONCURRENCY = 100


async def run(ctx: Context) -> list[Row]:
    size = ctx.size
    relay = RelaySystem()
    rows: list[Row] = []
    for listen in (True, False):
        for rate in size.latency_rates:
            mode = "LISTEN/NOTIFY" if listen else f"--no-listen (poll {POLL_INTERVAL:g}s)"
            row = Row("latency", f"{rate}/s, {mode}", {"rate": rate, "listen": listen})
            for run_no in range(ctx.runs):
                ctx.progress(f"latency run {run_no + 1}: {row.label}")
                figures, samples = await stream_once(
                    ctx,
                    relay,
                    rate,
                    size.latency_seconds,
                    producer_count=size.latency_producers,
                    listen=listen,
                    poll_interval=POLL_INTERVAL,
                    concurrency=8,
                    batch_size=100,
                )
                row.add(figures)
                row.samples_ms += [s * 1000 for s in samples]
            rows.append(row)
    best, stopped_by = await _highest_sustained(ctx, relay)
    if best is not None:
        row = Row(
            "latency",
            f"{best}/s, LISTEN/NOTIFY, concurrency {MAX_RATE_CONCURRENCY} (highest rate kept up)",
            {"rate": best, "concurrency": MAX_RATE_CONCURRENCY},
        )
        row.notes["next step"] = stopped_by
        for run_no in range(ctx.runs):
            ctx.progress(f"latency run {run_no + 1}: {row.label}")
            figures, samples = await _stream(ctx, relay, best, size.latency_seconds)
            row.add(figures)
            row.samples_ms += [s * 1000 for s in samples]
        rows.append(row)
    return rows


async def _stream(
    ctx: Context, relay: RelaySystem, rate: int, seconds: float
) -> tuple[dict[str, float], list[float]]:
    return await stream_once(
        ctx,
        relay,
        rate,
        seconds,
        producer_count=max(ctx.size.latency_producers, 16),
        listen=True,
        poll_interval=POLL_INTERVAL,
        concurrency=MAX_RATE_CONCURRENCY,
        batch_size=100,
    )


async def _highest_sustained(ctx: Context, relay: RelaySystem) -> tuple[int | None, str]:
    """Step the rate up (one short run each) until it is not kept up: achieved rate under
    95 % of the target (producers or relay too slow), or p99 over the limit."""
    best = None
    for rate in ctx.size.max_rate_steps:
        ctx.progress(f"latency: trying {rate}/s")
        figures, _ = await _stream(ctx, relay, rate, ctx.size.max_rate_seconds)
        if not keeps_up(figures, rate, ctx.size.keep_up_p99_ms):
            return best, (
                f"{rate}/s not kept up: achieved {figures['achieved_per_s']:.0f}/s, "
                f"p99 {figures['p99_ms']:.1f} ms"
            )
        best = rate
    return best, "every step kept up"
