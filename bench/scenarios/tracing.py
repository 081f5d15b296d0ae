"""10. Tracing: what trace context and delivery spans cost a drain. The same backlog, drained
in the same round (so the ratios are fair): tracing off, the default; the relay of
--baseline REV, if given (before trace context existed); tracing off with a trace context on
every intent (the relay passes it on as it is); tracing on (the OpenTelemetry SDK, a batch
span processor exporting to memory: the span's cost, not the exporter's), with a context on
every intent and without."""

from __future__ import annotations

from typing import Any

import asyncpg

from bench.context import Context
from bench.drive import drain_once
from bench.figures import Row
from bench.sql import query
from bench.systems import Installed, RelaySystem

TITLE = "Tracing (no-op handler, one worker process, concurrency 64)"
METRICS = ("intents_per_s", "vs_off", "worker_us_per_intent", "worker_cpu")
CONCURRENCY = 64


async def _seed_traced(conn: asyncpg.Connection, inst: Installed, n: int) -> None:
    await conn.execute(query("seed_traced", inst.names), n, "bench")


async def run(ctx: Context) -> list[Row]:
    n = ctx.size.drain_intents
    relay = RelaySystem()
    # (row, system, worker options); the first is what the others are compared with.
    plan: list[tuple[Row, RelaySystem, dict[str, Any]]] = [
        (Row("tracing", f"drain {n:,}, tracing off", {"trace": False, "context": False}),
         relay, {}),
        (Row("tracing", f"drain {n:,}, tracing off, every intent with a trace context",
             {"trace": False, "context": True}), relay, {"seed": _seed_traced}),
        (Row("tracing", f"drain {n:,}, tracing on, every intent with a trace context",
             {"trace": True, "context": True}), relay, {"seed": _seed_traced, "trace": True}),
        (Row("tracing", f"drain {n:,}, tracing on, no trace context (new traces)",
             {"trace": True, "context": False}), relay, {"trace": True}),
    ]  # fmt: skip
    if isinstance(ctx.baseline, RelaySystem):
        label = f"drain {n:,}, {ctx.baseline.name} (baseline)"
        plan.insert(1, (Row("tracing", label, {"baseline": True}), ctx.baseline, {}))
    for run_no in range(ctx.runs):
        ctx.progress(f"tracing run {run_no + 1}")
        reference = 0.0
        for row, system, worker in plan:
            figures = await drain_once(ctx, system, n, concurrency=CONCURRENCY, **worker)
            reference = reference or figures["intents_per_s"]
            row.add({**figures, "vs_off": figures["intents_per_s"] / reference})
    return [row for row, _, _ in plan]
