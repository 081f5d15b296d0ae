"""1. Drain throughput: a committed backlog, a no-op handler, one worker process."""

from __future__ import annotations

from bench.context import Context
from bench.drive import drain_once
from bench.figures import Row
from bench.systems import RelaySystem

TITLE = "Drain throughput (backlog committed first, no-op handler, one worker process)"
METRICS = ("intents_per_s", "worker_cpu", "pg_cpu", "worker_us_per_intent")


async def run(ctx: Context) -> list[Row]:
    size = ctx.size
    relay = RelaySystem()
    rows = [
        Row("drain", f"outbox-worker, concurrency {c}, batch {b}", {"concurrency": c, "batch": b})
        for c, b in size.drain_grid
    ]
    bare = [
        Row("drain", f"reference: bare SKIP LOCKED claim+delete loop, batch {b}", {"batch": b})
        for b in size.bare_batches
    ]
    for run_no in range(ctx.runs):
        # Interleaved: every configuration once per round, so drift hits all alike.
        for row, (c, b) in zip(rows, size.drain_grid, strict=True):
            ctx.progress(f"drain run {run_no + 1}: {row.label}")
            row.add(
                await drain_once(
                    ctx,
                    relay,
                    size.drain_intents,
                    concurrency=c,
                    batch_size=b,
                    poll_interval=2.0,
                    listen=True,
                )
            )
        for row, b in zip(bare, size.bare_batches, strict=True):
            ctx.progress(f"drain run {run_no + 1}: {row.label}")
            row.add(await drain_once(ctx, relay, size.drain_intents, kind="bare", batch_size=b))
    return rows + bare
