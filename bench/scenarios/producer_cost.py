"""4. Producer cost of the notify trigger: N producers commit single-intent transactions
flat out, with no trigger, with an always-notify trigger, and with main's trigger.

A relay (LISTEN, default settings) drains the table all along, as in production: main's
trigger notifies only when a worker has declared itself idle, so what it costs depends on
how often the relay goes idle under that load.
"""

from __future__ import annotations

import asyncpg

from bench import producers
from bench.context import Context
from bench.drive import stream_once, warm_up
from bench.figures import Row, latency_figures
from bench.proc import worker_process
from bench.sql import query
from bench.systems import Installed, RelaySystem
from worker.store.sqlfiles import quote_ident

TITLE = "Producer cost of the notify trigger (single-intent transactions, flat out)"
METRICS = (
    "commits_per_s",
    "p50_ms",
    "p99_ms",
    "vs_no_trigger",
    "notifications",
    "wake_p50_ms",
    "wake_p99_ms",
)
VARIANTS = {
    "none": "no trigger",
    "always": "always-notify statement trigger (b86cd5d)",
    "main": "main's trigger (triggers/ as shipped)",
}


async def apply_variant(inst: Installed, variant: str, conn: asyncpg.Connection) -> None:
    """Swap the triggers of a freshly migrated schema for the variant under test."""
    if variant == "main":
        return
    table = f"{quote_ident(inst.names.schema)}.intent"
    for row in await conn.fetch(query("user_triggers"), table):
        await conn.execute(f"DROP TRIGGER {quote_ident(row['tgname'])} ON {table}")
    if variant == "always":
        await conn.execute(query("always_notify_trigger", inst.names))


async def measure(ctx: Context, variant: str, producer_count: int) -> dict[str, float]:
    relay = RelaySystem()
    async with relay.install(ctx.dsn) as inst, ctx.admin() as conn:
        await apply_variant(inst, variant, conn)
        async with (
            worker_process("relay", ctx.log_dir, **relay.worker_config(inst), listen=True) as proc,
            relay.producers(inst, producer_count) as produce,
        ):
            await proc.go()
            await warm_up(proc, produce)
            before = (await proc.info())["notifications"]
            result = await producers.flat_out(produce, ctx.size.producer_seconds)
            after = (await proc.info())["notifications"]
            await proc.stop()
    figures = latency_figures(result.durations)
    return {
        "commits_per_s": result.commits / result.elapsed,
        "p50_ms": figures["p50_ms"],
        "p99_ms": figures["p99_ms"],
        "notifications": float(after - before),
    }


async def run(ctx: Context) -> list[Row]:
    rows = {
        (v, n): Row("producer-cost", f"{n} producers, {label}", {"variant": v, "producers": n})
        for n in ctx.size.producer_counts
        for v, label in VARIANTS.items()
    }
    for run_no in range(max(ctx.runs, ctx.size.producer_runs_at_least)):
        for n in ctx.size.producer_counts:
            # Rotate the order every run, so no variant always goes first after a pause.
            order = list(VARIANTS)
            order = order[run_no % 3 :] + order[: run_no % 3]
            results = {}
            for variant in order:
                ctx.progress(f"producer cost run {run_no + 1}: {n} producers, {variant}")
                results[variant] = await measure(ctx, variant, n)
            base = results["none"]["commits_per_s"]
            for variant, figures in results.items():
                figures["vs_no_trigger"] = figures["commits_per_s"] / base
                rows[variant, n].add(figures)
    return [*rows.values(), *await _wake_up_latency(ctx)]


async def _wake_up_latency(ctx: Context) -> list[Row]:
    """The other side of the trade: how fast a lone intent is picked up at low load."""
    rate = ctx.size.latency_rates[0]
    rows = {
        v: Row(
            "producer-cost", f"wake-up latency at {rate}/s, {label}", {"variant": v, "rate": rate}
        )
        for v, label in VARIANTS.items()
    }
    for run_no in range(ctx.runs):
        for variant, row in rows.items():
            ctx.progress(f"producer cost run {run_no + 1}: {row.label}")

            async def prepare(inst: Installed, variant: str = variant) -> None:
                async with ctx.admin() as conn:
                    await apply_variant(inst, variant, conn)

            figures, samples = await stream_once(
                ctx, RelaySystem(), rate, ctx.size.latency_seconds,
                producer_count=ctx.size.latency_producers, prepare=prepare, listen=True,
            )  # fmt: skip
            row.add(
                {
                    "wake_p50_ms": figures["p50_ms"],
                    "wake_p99_ms": figures["p99_ms"],
                    "notifications": figures.get("notifications", 0.0),
                }
            )
            row.samples_ms += [x * 1000 for x in samples]
    return list(rows.values())
