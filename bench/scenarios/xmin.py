"""13. A held xmin horizon: one idle-in-transaction REPEATABLE READ session keeps vacuum from
removing anything while producers commit a steady stream. Per window (by commit time): commit
-> handler latency, the claim statement's time (timed in the worker), the intent table's dead
tuples. Flat is the goal (issue 21): last window's p99 <= 2x the first's, or <= 10 ms."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import AsyncIterator

import anyio
import asyncpg

from bench import producers
from bench.context import Context
from bench.drive import warm_up
from bench.figures import Row, percentile
from bench.proc import worker_process
from bench.sql import query
from bench.systems import Installed, RelaySystem

TITLE = "Held xmin horizon (idle-in-transaction REPEATABLE READ; per window of commit time)"
METRICS = ("achieved_per_s", "p50_ms", "p99_ms", "claim_ms_mean", "claim_ms_p99", "dead_tuples")
HOLDER_APP = "bench xmin holder"


async def run(ctx: Context) -> list[Row]:
    size = ctx.size
    windows = max(1, math.ceil(size.xmin_seconds / size.xmin_window - 1e-9))
    rows = []
    for i in range(windows):
        start = i * size.xmin_window
        end = min(size.xmin_seconds, start + size.xmin_window)
        rows.append(Row("xmin", f"{size.xmin_rate}/s, {start:g}-{end:g} s", {"window": i}))
    for run_no in range(min(ctx.runs, size.xmin_runs_at_most)):
        ctx.progress(f"xmin run {run_no + 1}: {size.xmin_rate}/s for {size.xmin_seconds:g} s")
        for row, figures in zip(rows, await _once(ctx), strict=True):
            row.add(figures)
    return rows


async def _once(ctx: Context) -> list[dict[str, float]]:
    size, relay = ctx.size, RelaySystem()
    window = size.xmin_window
    async with (
        relay.install(ctx.dsn) as inst,
        worker_process(
            relay.kind,
            ctx.log_dir,
            **relay.worker_config(inst),
            concurrency=8,
            batch_size=100,
            listen=True,
            time_claims=True,
        ) as proc,
        relay.producers(inst, 4) as produce,
        _held_snapshot(inst) as holder,
    ):
        await proc.go()
        await warm_up(proc, produce)
        dead: list[tuple[float, int]] = []
        begin = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_sample_dead, holder, inst, begin, window, dead)
            result = await producers.at_rate(produce, size.xmin_rate, size.xmin_seconds)
            handled = 1 + len(result.commits)
            await proc.wait_handled(handled, timeout=max(120, size.xmin_seconds))
            tg.cancel_scope.cancel()
        dead.append((time.monotonic() - begin, await _dead_tuples(holder, inst)))
        info = await proc.info()
        starts = await proc.stop()
    claims = [(t - begin, s) for t, s in info["claim_times"]]
    out = []
    for i in range(max(1, math.ceil(size.xmin_seconds / window - 1e-9))):
        lo, hi = i * window, (i + 1) * window
        lat = sorted(
            (starts[k] - t) * 1000 for k, t in result.commits.items() if lo <= t - begin < hi
        )
        took = sorted(s * 1000 for end, s in claims if lo <= end < hi)
        at_end = [n for t, n in dead if t >= hi] or [dead[-1][1]]
        out.append(
            {
                "achieved_per_s": len(lat) / window,
                "p50_ms": percentile(lat, 50),
                "p99_ms": percentile(lat, 99),
                "claim_ms_mean": sum(took) / len(took) if took else math.nan,
                "claim_ms_p99": percentile(took, 99),
                "dead_tuples": float(at_end[0]),
            }
        )
    return out


@contextlib.asynccontextmanager
async def _held_snapshot(inst: Installed) -> AsyncIterator[asyncpg.Connection]:
    """A session that begins REPEATABLE READ, takes its snapshot and then sits idle in the
    transaction: the horizon stays at that snapshot's xmin until it ends. The same connection
    reads the statistics (pg_stat_* are not MVCC, a fresh read needs no fresh snapshot)."""
    conn = await asyncpg.connect(
        inst.dsn,
        server_settings={
            "application_name": HOLDER_APP,
            "idle_in_transaction_session_timeout": "0",
        },
    )
    try:
        async with conn.transaction(isolation="repeatable_read"):
            await conn.fetchval(query("unfinished", inst.names))  # takes the snapshot
            yield conn
    finally:
        await conn.close()


async def _dead_tuples(conn: asyncpg.Connection, inst: Installed) -> int:
    # pg_stat_clear_snapshot: inside a transaction the statistics are read once and kept.
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    return int(await conn.fetchval(query("dead_tuples", inst.names)) or 0)


async def _sample_dead(
    conn: asyncpg.Connection,
    inst: Installed,
    begin: float,
    window: float,
    out: list[tuple[float, int]],
) -> None:
    """The intent table's dead tuples at the end of each window."""
    i = 1
    while True:
        await anyio.sleep(max(0.0, begin + i * window - time.monotonic()))
        out.append((time.monotonic() - begin, await _dead_tuples(conn, inst)))
        i += 1
