"""3. Lost notification: the LISTEN connection is killed; an intent is committed at once.
How long until it is delivered (by the poll, or by the listener's catch-up on reconnect)?"""

from __future__ import annotations

import time

import anyio

from bench.context import Context
from bench.drive import warm_up
from bench.figures import Row, latencies, latency_figures
from bench.proc import WorkerProcess, worker_process
from bench.sql import query
from bench.systems import RelaySystem

TITLE = "Lost notification (LISTEN backend killed, then one intent committed)"
METRICS = ("p50_ms", "max_ms", "bound_ms")


async def run(ctx: Context) -> list[Row]:
    poll = ctx.size.lost_poll_interval
    row = Row("lost-notification", f"poll interval {poll:g}s", {"poll_interval": poll})
    relay = RelaySystem()
    for run_no in range(ctx.runs):
        ctx.progress(f"lost notification run {run_no + 1}")
        async with (
            relay.install(ctx.dsn) as inst,
            ctx.admin() as conn,
            worker_process(
                "relay",
                ctx.log_dir,
                **relay.worker_config(inst),
                listen=True,
                poll_interval=poll,
                concurrency=8,
                batch_size=100,
            ) as proc,
            relay.producers(inst, 1) as (produce, *_),
        ):
            await proc.go()
            await warm_up(proc, [produce])
            commits: dict[int, float] = {}
            for k in range(ctx.size.lost_samples):
                pid = await _listening(proc, previous=None)
                await conn.execute(query("terminate_backend"), pid)
                await produce(k)
                commits[k] = time.monotonic()
                await proc.wait_handled(2 + k, timeout=10 * poll + 30)
                await _listening(proc, previous=pid)  # reconnected before the next sample
            starts = await proc.stop()
        samples = latencies(commits, starts)
        figures = latency_figures(samples)
        row.add(
            {
                "p50_ms": figures["p50_ms"],
                "max_ms": figures["max_ms"],
                "bound_ms": poll * 1000 + 100,
            }
        )
        row.samples_ms += [s * 1000 for s in samples]
    return [row]


async def _listening(proc: WorkerProcess, previous: int | None) -> int:
    """The listener's backend pid, once it is connected (with a new backend if given)."""
    with anyio.fail_after(60):
        while True:
            info = await proc.info()
            pid = info.get("listener_pid")
            if info.get("listener_connected") and pid and pid != previous:
                return int(pid)
            await anyio.sleep(0.02)
