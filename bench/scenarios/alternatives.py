"""7. The alternatives and the old relay, driven exactly like the relay on the same database
in the same run: drain throughput (the relay and its baseline at --concurrency 64 with their
defaults otherwise; the alternatives at the settings their documentation recommends for
throughput, swept) and latency at a steady rate. Every ratio is taken within one round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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

TITLE = "Alternatives and the old relay, same database, same run (no-op handler)"
METRICS = (
    "intents_per_s",
    "vs_pgqueuer_best",
    "worker_cpu",
    "pg_cpu",
    "worker_us_per_intent",
    "cpu_vs_baseline",
    "achieved_per_s",
    "p50_ms",
    "p99_ms",
    "max_ms",
    "p50_vs_pgqueuer",
    "p99_vs_pgqueuer",
)
# Printed as two tables (title, metrics, params["test"]): the drains, the steady rate.
TABLES = (
    ("Alternatives and the old relay: drains, same run (no-op handler)", METRICS[:6], "drain"),
    ("Alternatives: latency at a steady rate, same run (no-op handler)", METRICS[6:], "latency"),
)
POLL_INTERVAL = 2.0  # the alternatives'; the relays run with their own defaults
RELAY_CONCURRENCY = 64


@dataclass
class Step:
    row: Row
    system: System
    test: str  # "drain" | "latency"
    n: int = 0  # intents to drain
    settings: dict[str, Any] = field(default_factory=dict)


def _relay_drain(system: RelaySystem, n: int, *, baseline: bool) -> Step:
    batch = system.default("batch_size")
    who = f"{system.name} (baseline)" if baseline else system.name
    return Step(
        Row(
            "alternatives",
            f"{who} drain, concurrency {RELAY_CONCURRENCY}, batch {batch} (default)",
            {
                "system": "outbox-worker",
                "baseline": baseline,
                "test": "drain",
                "n": n,
                "concurrency": RELAY_CONCURRENCY,
                "batch": batch,
            },
        ),
        system,
        "drain",
        n,
        {"concurrency": RELAY_CONCURRENCY},
    )


def _plan(ctx: Context) -> list[Step]:
    size = ctx.size
    found = alternatives_installed()
    relay = RelaySystem()
    plan = [_relay_drain(relay, size.drain_intents, baseline=False)]
    if isinstance(ctx.baseline, RelaySystem):
        plan.append(_relay_drain(ctx.baseline, size.drain_intents, baseline=True))
    if found["pgqueuer"]:
        for b in size.pgqueuer_batches:
            params = {"system": "pgqueuer", "test": "drain", "batch": b, "n": size.pgqueuer_intents}
            plan.append(
                Step(
                    Row("alternatives", f"pgqueuer drain, batch_size {b}", params),
                    PgqueuerSystem(),
                    "drain",
                    size.pgqueuer_intents,
                    {"batch_size": b, "poll_interval": POLL_INTERVAL},
                )
            )
    if found["procrastinate"]:
        for c in size.procrastinate_concurrency:
            params = {"system": "procrastinate", "test": "drain", "concurrency": c,
                      "n": size.procrastinate_intents}  # fmt: skip
            plan.append(
                Step(
                    Row("alternatives", f"procrastinate drain, concurrency {c}", params),
                    ProcrastinateSystem(),
                    "drain",
                    size.procrastinate_intents,
                    {"concurrency": c, "poll_interval": POLL_INTERVAL},
                )
            )
    rate = size.alt_latency_rate
    relay_label = (
        f"defaults: concurrency {relay.default('concurrency')}, batch {relay.default('batch_size')}"
    )
    latency: list[tuple[System, str, dict[str, Any]]] = [(relay, relay_label, {})]
    if found["pgqueuer"]:
        latency.append((PgqueuerSystem(), "batch_size 10", {"batch_size": 10}))
    if found["procrastinate"]:
        latency.append((ProcrastinateSystem(), "concurrency 10", {"concurrency": 10}))
    for system, label, settings in latency:
        if system is not relay:
            settings["poll_interval"] = POLL_INTERVAL
        plan.append(
            Step(
                Row(
                    "alternatives",
                    f"{system.name} latency at {rate}/s ({label})",
                    {"system": system.name, "test": "latency", "rate": rate, **settings},
                ),
                system,
                "latency",
                settings=settings,
            )
        )
    return plan


async def _measure(ctx: Context, step: Step) -> tuple[dict[str, float], list[float]]:
    if step.test == "drain":
        return await drain_once(ctx, step.system, step.n, **step.settings), []
    figures, samples = await stream_once(
        ctx,
        step.system,
        ctx.size.alt_latency_rate,
        ctx.size.latency_seconds,
        producer_count=ctx.size.alt_latency_producers,
        **step.settings,
    )
    figures.pop("notifications", None)
    return figures, samples


def same_round_ratios(round_: list[tuple[Step, dict[str, float]]]) -> None:
    """Add this round's ratios to the relays' figures: drain vs pgqueuer's best batch size,
    CPU per intent vs the baseline relay's, latency percentiles vs pgqueuer's."""

    def of(test: str, system: str, baseline: bool = False) -> list[dict[str, float]]:
        return [
            fig
            for step, fig in round_
            if step.row.params["test"] == test
            and step.row.params["system"] == system
            and step.row.params.get("baseline", False) == baseline
        ]

    pgq_drains = [f["intents_per_s"] for f in of("drain", "pgqueuer")]
    relays = of("drain", "outbox-worker") + of("drain", "outbox-worker", baseline=True)
    for fig in relays:
        if pgq_drains:
            fig["vs_pgqueuer_best"] = fig["intents_per_s"] / max(pgq_drains)
    for new, old in zip(
        of("drain", "outbox-worker"), of("drain", "outbox-worker", True), strict=False
    ):
        new["cpu_vs_baseline"] = new["worker_us_per_intent"] / old["worker_us_per_intent"]
    for mine, theirs in zip(
        of("latency", "outbox-worker"), of("latency", "pgqueuer"), strict=False
    ):
        for p in ("p50", "p99"):
            mine[f"{p}_vs_pgqueuer"] = mine[f"{p}_ms"] / theirs[f"{p}_ms"]


async def run(ctx: Context) -> list[Row]:
    plan = _plan(ctx)
    for run_no in range(ctx.runs):
        round_ = []
        for step in plan:
            ctx.progress(f"alternatives run {run_no + 1}: {step.row.label}")
            figures, samples = await _measure(ctx, step)
            step.row.samples_ms += [s * 1000 for s in samples]
            round_.append((step, figures))
        same_round_ratios(round_)
        for step, figures in round_:
            step.row.add(figures)
    return [step.row for step in plan]
