"""7. The alternatives, driven exactly like the relay on the same database in the same run:
drain throughput (each at the settings its documentation recommends for throughput, swept)
and latency at a steady rate. The relay is measured alongside, so the ratios are same-run.
"""

from __future__ import annotations

from typing import Any

from bench.context import Context
from bench.drive import drain_once, stream_once
from bench.figures import Row
from bench.systems import (
    PgqueuerSystem,
    ProcrastinateSystem,
    RelaySystem,
    System,
    alternatives_installed,
)

TITLE = "Alternatives, same database, same run (no-op handler)"
METRICS = ("intents_per_s", "worker_cpu", "pg_cpu", "achieved_per_s", "p50_ms", "p99_ms", "max_ms")
POLL_INTERVAL = 2.0
RELAY_DRAIN = {"concurrency": 1000, "batch_size": 1000}


def _plan(ctx: Context) -> list[tuple[Row, System, str, dict[str, Any]]]:
    """(row, system, "drain" | "latency", worker settings) for everything measured."""
    size = ctx.size
    found = alternatives_installed()
    relay = RelaySystem()
    plan: list[tuple[Row, System, str, dict[str, Any]]] = [
        (
            Row(
                "alternatives",
                "outbox-worker drain, concurrency 1000, batch 1000",
                {"system": relay.name, "test": "drain", "n": size.drain_intents},
            ),
            relay,
            "drain",
            {**RELAY_DRAIN, "listen": True},
        )
    ]
    if found["pgqueuer"]:
        pgq = PgqueuerSystem()
        for b in size.pgqueuer_batches:
            plan.append(
                (
                    Row(
                        "alternatives",
                        f"pgqueuer drain, batch_size {b}",
                        {
                            "system": pgq.name,
                            "test": "drain",
                            "batch": b,
                            "n": size.pgqueuer_intents,
                        },
                    ),
                    pgq,
                    "drain",
                    {"batch_size": b},
                )
            )
    if found["procrastinate"]:
        proc = ProcrastinateSystem()
        for c in size.procrastinate_concurrency:
            plan.append(
                (
                    Row(
                        "alternatives",
                        f"procrastinate drain, concurrency {c}",
                        {
                            "system": proc.name,
                            "test": "drain",
                            "concurrency": c,
                            "n": size.procrastinate_intents,
                        },
                    ),
                    proc,
                    "drain",
                    {"concurrency": c},
                )
            )
    rate = size.alt_latency_rate
    latency: list[tuple[System, dict[str, Any]]] = [
        (relay, {"listen": True, "concurrency": 8, "batch_size": 100})
    ]
    if found["pgqueuer"]:
        latency.append((PgqueuerSystem(), {"batch_size": 10}))
    if found["procrastinate"]:
        latency.append((ProcrastinateSystem(), {"concurrency": 10}))
    for system, settings in latency:
        plan.append(
            (
                Row(
                    "alternatives",
                    f"{system.name} latency at {rate}/s",
                    {"system": system.name, "test": "latency", "rate": rate, **settings},
                ),
                system,
                "latency",
                settings,
            )
        )
    return plan


def _drain_size(ctx: Context, system: System) -> int:
    if isinstance(system, PgqueuerSystem):
        return ctx.size.pgqueuer_intents
    if isinstance(system, ProcrastinateSystem):
        return ctx.size.procrastinate_intents
    return ctx.size.drain_intents


async def run(ctx: Context) -> list[Row]:
    plan = _plan(ctx)
    for run_no in range(ctx.runs):
        for row, system, test, settings in plan:
            ctx.progress(f"alternatives run {run_no + 1}: {row.label}")
            if test == "drain":
                row.add(
                    await drain_once(
                        ctx,
                        system,
                        _drain_size(ctx, system),
                        poll_interval=POLL_INTERVAL,
                        **settings,
                    )
                )
            else:
                figures, samples = await stream_once(
                    ctx,
                    system,
                    ctx.size.alt_latency_rate,
                    ctx.size.latency_seconds,
                    producer_count=ctx.size.alt_latency_producers,
                    poll_interval=POLL_INTERVAL,
                    **settings,
                )
                figures.pop("notifications", None)
                row.add(figures)
                row.samples_ms += [s * 1000 for s in samples]
    return [row for row, *_ in plan]
