"""5. Idle cost: the queries a worker sends when there is nothing to do, counted on the wire
by a proxy between it and PostgreSQL (bench/wire.py)."""

from __future__ import annotations

import itertools
import statistics

import anyio

from bench.context import Context
from bench.figures import Row
from bench.proc import worker_process
from bench.server import socket_address
from bench.systems import PgqueuerSystem, ProcrastinateSystem, RelaySystem, System
from bench.wire import counting_proxy, via_proxy
from worker.settings import default_channel
from worker.store.sqlfiles import Names, load_queries

TITLE = "Idle cost (nothing to do; queries counted on the wire)"
METRICS = ("queries_per_s", "queries_per_poll", "claims_per_poll", "shortest_gap_s")


def _relay_claim_texts(schema: str) -> set[str]:
    queries = load_queries(Names(schema, default_channel(schema)))
    return {" ".join(queries["claim"].split())}


async def measure(ctx: Context, system: System) -> tuple[dict[str, float], dict[str, int]]:
    poll = ctx.size.idle_poll_interval
    seconds = ctx.size.idle_seconds
    async with (
        system.install(ctx.dsn) as inst,
        counting_proxy(socket_address(ctx.dsn)) as (port, counter),
    ):
        config = system.worker_config(inst) | {"dsn": via_proxy(ctx.dsn, port)}
        async with worker_process(
            system.kind,
            ctx.log_dir,
            **config,
            listen=True,
            poll_interval=poll,
            concurrency=8,
            batch_size=100,
        ) as proc:
            await proc.go()
            await anyio.sleep(poll * 2)  # past start-up: catch-up claims, first sweeps
            counter.reset()
            start = anyio.current_time()
            await anyio.sleep(seconds)  # the window itself: nothing to do, just count
            elapsed = anyio.current_time() - start
            counted = dict(counter.by_text)
            times = {text: list(ts) for text, ts in counter.times.items()}
            await proc.stop()
    total = sum(counted.values())
    figures = {
        "queries_per_s": total / elapsed,
        "queries_per_poll": total / elapsed * poll,
    }
    if isinstance(system, RelaySystem):
        texts = _relay_claim_texts(inst.names.schema)
        claims = sorted(t for text, ts in times.items() if text in texts for t in ts)
        # Measured between claims, not over the window: a window of n poll intervals can
        # hold n + 1 claims without any interval being short.
        if len(claims) >= 2:
            gaps = [b - a for a, b in itertools.pairwise(claims)]
            figures["claims_per_poll"] = poll / statistics.mean(gaps)
            figures["shortest_gap_s"] = min(gaps)
    return figures, counted


async def run(ctx: Context) -> list[Row]:
    systems: list[System] = [RelaySystem()]
    from bench.systems import alternatives_installed

    found = alternatives_installed()
    if found["pgqueuer"]:
        systems.append(PgqueuerSystem())
    if found["procrastinate"]:
        systems.append(ProcrastinateSystem())
    poll = ctx.size.idle_poll_interval
    rows = [
        Row("idle", f"{s.name}, poll interval {poll:g}s", {"system": s.name, "poll": poll})
        for s in systems
    ]
    for run_no in range(ctx.runs):
        for row, system in zip(rows, systems, strict=True):
            ctx.progress(f"idle run {run_no + 1}: {system.name}")
            figures, counted = await measure(ctx, system)
            row.add(figures)
            row.notes.setdefault("statements (last run)", counted)
            row.notes["statements (last run)"] = {t[:120]: n for t, n in counted.items()}
    return rows
