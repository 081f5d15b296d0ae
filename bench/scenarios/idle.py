"""5. Idle cost: the queries a worker sends when there is nothing to do, counted on the wire
by a proxy between it and PostgreSQL (bench/wire.py)."""

from __future__ import annotations

import anyio

from bench.context import Context
from bench.figures import Row
from bench.proc import worker_process
from bench.server import socket_address
from bench.systems import PgqueuerSystem, ProcrastinateSystem, RelaySystem, System
from bench.wire import counting_proxy, via_proxy
from worker.settings import default_channel
from worker.sqlfiles import Names, load_queries

TITLE = "Idle cost (nothing to do; queries counted on the wire)"
METRICS = ("queries_per_s", "claims_per_poll", "queries_per_poll")


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
            await proc.stop()
    claims = 0
    if isinstance(system, RelaySystem):
        texts = _relay_claim_texts(inst.names.schema)
        claims = sum(n for text, n in counted.items() if text in texts)
    total = sum(counted.values())
    figures = {
        "queries_per_s": total / elapsed,
        "queries_per_poll": total / elapsed * poll,
    }
    if isinstance(system, RelaySystem):
        figures["claims_per_poll"] = claims / elapsed * poll
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
