"""9. Ordering keys: what per-key order costs. Drains of the same backlog unordered and
over many keys (same round, so the ratio is fair), one key alone (strictly serial: the
price of order), and latency at a steady rate over a few keys next to unordered."""

from __future__ import annotations

from bench.context import Context
from bench.drive import drain_once, stream_once
from bench.figures import Row
from bench.systems import KeyedRelaySystem, RelaySystem

TITLE = "Ordering keys (no-op handler, one worker process, concurrency 64)"
METRICS = ("intents_per_s", "vs_unordered", "p50_ms", "p99_ms", "worker_us_per_intent")
CONCURRENCY = 64


async def run(ctx: Context) -> list[Row]:
    size = ctx.size
    n, keys = size.drain_intents, size.ordering_keys
    unordered, keyed = RelaySystem(), KeyedRelaySystem(keys=keys)
    drain_rows = [
        Row("ordering", f"drain {n:,}, unordered", {"test": "drain", "keys": 0}),
        Row("ordering", f"drain {n:,} over {keys:,} keys", {"test": "drain", "keys": keys}),
    ]
    one = size.ordering_one_key_intents
    one_key = Row("ordering", f"one key, {one:,} intents (serial)", {"test": "drain", "keys": 1})
    rate, few = size.ordering_rate, size.ordering_latency_keys
    stream_rows = [
        Row("ordering", f"{rate:,}/s, unordered", {"test": "latency", "keys": 0}),
        Row("ordering", f"{rate:,}/s over {few} keys", {"test": "latency", "keys": few}),
    ]
    for run_no in range(ctx.runs):
        ctx.progress(f"ordering run {run_no + 1}: drains")
        base = await drain_once(ctx, unordered, n, concurrency=CONCURRENCY)
        ordered = await drain_once(ctx, keyed, n, concurrency=CONCURRENCY)
        drain_rows[0].add({**base, "vs_unordered": 1.0})
        ordered["vs_unordered"] = ordered["intents_per_s"] / base["intents_per_s"]
        drain_rows[1].add(ordered)
        one_key.add(await drain_once(ctx, KeyedRelaySystem(keys=1), one, concurrency=CONCURRENCY))
        ctx.progress(f"ordering run {run_no + 1}: {rate}/s")
        for row, system in zip(stream_rows, (unordered, KeyedRelaySystem(keys=few)), strict=True):
            figures, samples = await stream_once(
                ctx,
                system,
                rate,
                size.latency_seconds,
                producer_count=size.alt_latency_producers,
                concurrency=CONCURRENCY,
            )
            row.add(figures)
            row.samples_ms += [s * 1000 for s in samples]
    return [*drain_rows, one_key, *stream_rows]
