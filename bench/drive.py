"""The two measurements most scenarios are made of, the same for every system:
drain a committed backlog, and deliver a steady stream."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

from bench import producers
from bench.context import Context, wait_until_false
from bench.figures import latencies, latency_figures
from bench.proc import CpuMeter, worker_process
from bench.systems import Installed, System

WARM_UP_KEY = -1


async def drain_once(
    ctx: Context, system: System, n: int, *, kind: str | None = None, **worker: Any
) -> dict[str, float]:
    """``n`` intents committed first; then one worker starts and takes them all.

    Time runs from just before the worker starts working (its pool already open) until the
    database shows nothing left to do; CPU over the same interval.
    """
    async with system.install(ctx.dsn) as inst, ctx.admin() as conn:
        seed = worker.pop("seed", None)
        await (seed(conn, inst, n) if seed else system.seed(conn, inst, n))
        async with worker_process(
            kind or system.kind,
            ctx.log_dir,
            tree=system.tree,
            **system.worker_config(inst),
            **worker,
        ) as proc:
            meter = CpuMeter(conn, proc)
            await meter.start()
            running = await proc.go()
            await proc.wait_handled(n, timeout=600)
            done = await wait_until_false(conn, system.unfinished_sql(inst), timeout=120)
            cpu = await meter.stop()
            await proc.stop()
    elapsed = done - running["t0"]
    cpu_seconds = cpu.pop("worker_cpu_s")
    return {
        "intents_per_s": n / elapsed,
        "seconds": elapsed,
        **cpu,
        "worker_us_per_intent": 1e6 * cpu_seconds / n,
    }


async def warm_up(proc: Any, produce: list[producers.Enqueue]) -> None:
    """One intent through the whole path before measuring: connections open, plans cached,
    LISTEN registered."""
    await produce[0](WARM_UP_KEY)
    await proc.wait_handled(1, timeout=30)


async def stream_once(
    ctx: Context,
    system: System,
    rate: float,
    seconds: float,
    *,
    producer_count: int,
    prepare: Callable[[Installed], Awaitable[None]] | None = None,
    **worker: Any,
) -> tuple[dict[str, float], list[float]]:
    """Producers commit ``rate`` intents/s for ``seconds``; latency = handler start minus
    the producer's commit. Returns the figures and the raw latencies (seconds).
    ``prepare`` may change the freshly installed schema before the worker starts."""
    async with system.install(ctx.dsn) as inst:
        if prepare is not None:
            await prepare(inst)
        async with (
            worker_process(
                system.kind, ctx.log_dir, tree=system.tree, **system.worker_config(inst), **worker
            ) as proc,
            system.producers(inst, producer_count) as produce,
        ):
            await proc.go()
            await warm_up(proc, produce)
            result = await producers.at_rate(produce, rate, seconds)
            # Generous: a system that cannot keep up still gets to finish its backlog.
            await proc.wait_handled(1 + len(result.commits), timeout=max(120, 30 * seconds))
            info = await proc.info()
            starts = await proc.stop()
    lat = latencies(result.commits, starts)
    figures = {"achieved_per_s": result.achieved_rate, **latency_figures(lat)}
    if "notifications" in info:
        figures["notifications"] = float(info["notifications"])
    return figures, lat


def keeps_up(figures: dict[str, float], rate: float, p99_limit_ms: float) -> bool:
    return (
        figures["achieved_per_s"] >= 0.95 * rate
        and not math.isnan(figures["p99_ms"])
        and figures["p99_ms"] <= p99_limit_ms
    )
