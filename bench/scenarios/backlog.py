"""A big backlog (issue 14): the relay was down for a day, a million intents wait.

One run: a fresh schema gets ``backlog_sent`` delivered rows (history) and then
``backlog_pending`` pending ones, each in one ``INSERT ... SELECT generate_series`` with the
notify trigger in place (a deferred per-row trigger: its events are queued and run at
commit; the first does the check, the rest return at once). Then, with the backlog there:

- the claim's plan, by ``EXPLAIN ANALYZE`` of the relay's own claim statement in a
  transaction that is rolled back: it must use an index, never scan the table (again
  half-way through the drain, with half a million dead entries at the head of its index);
- producers commit flat out for a while with no worker running (the baseline);
- one worker (a subprocess, concurrency ``backlog_concurrency``) drains it all while this
  process samples the worker's RSS, times the dashboard's health query and the ``status``
  command, and runs the same producers again, flat out, in the middle of the drain; what
  the producers' server processes wait on is sampled both times (a lock, the WAL, ...).

The worker keeps no per-intent bench bookkeeping (``per_intent: false``), so its memory is
the relay's own.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import anyio
import asyncpg
import orjson
import psutil

from bench import producers
from bench.context import Context, wait_until_false
from bench.figures import Row, percentile
from bench.proc import WorkerProcess, worker_process
from bench.sql import query
from bench.systems import Installed, RelaySystem
from worker.cli.admin import status
from worker.observe.health import COUNT_CAP
from worker.store.queries import FULL_SCAN
from worker.store.sqlfiles import load_queries

DRAIN = ("intents_per_s", "seconds", "seed_s", "claim_ms", "claim_halfway_ms", "index_scan")
MEMORY = ("rss_start_mb", "rss_quarter_mb", "rss_peak_mb", "rss_end_mb")
WAITS = ("lock_pct", "wal_pct", "client_pct", "cpu_pct")
DURING = ("p50_ms", "p99_ms", "max_ms", "samples", "commits_per_s", "vs_no_drain", *WAITS)
CURVE = ("rss_mb", "drained", "intents_per_s")
TITLE = "Big backlog: pending intents (relay down for a day) drained by one worker"
METRICS = DRAIN + MEMORY
TABLES = [
    (TITLE + " (seeding, claim plan, throughput)", DRAIN, "drain"),
    ("Big backlog: worker RSS (MB) at the start, a quarter in, peak, end", MEMORY, "memory"),
    ("Big backlog: dashboard, status and producers while it drains", DURING, "during"),
    ("Big backlog: worker RSS over the drain", CURVE, "rss"),
]
_SAMPLE_EVERY = 0.5  # seconds between RSS samples
_CURVE_POINTS = 16
_MB = 1024 * 1024
_PRODUCER_APP = "bench backlog producer"


@dataclass
class _Drain:
    """What the probes running beside the drain collect."""

    total: int  # intents the worker must handle before the drain is over
    samples: list[tuple[float, float, int]] = field(default_factory=list)  # t, rss MB, handled
    health_ms: list[float] = field(default_factory=list)
    status_ms: list[float] = field(default_factory=list)
    producing_done: bool = False
    halfway: anyio.Event = field(default_factory=anyio.Event)
    done: anyio.Event = field(default_factory=anyio.Event)
    claim_halfway: tuple[float, str] = (0.0, "")


async def _claim_plan(conn: asyncpg.Connection, inst: Installed, limit: int) -> tuple[float, str]:
    """(execution ms, the scans on the intent table) of one real claim, rolled back."""
    claim = load_queries(inst.names)["claim"]
    tr = conn.transaction()
    await tr.start()
    try:
        explained = await conn.fetchval(
            f"EXPLAIN (ANALYZE, FORMAT JSON) {claim}", "explain", 30.0, limit, [], *FULL_SCAN
        )
    finally:
        await tr.rollback()
    [plan] = orjson.loads(explained) if isinstance(explained, str) else explained
    scans = sorted(set(_scans(plan["Plan"])))
    return float(plan["Execution Time"]), ", ".join(scans)


def _scans(node: dict[str, Any]) -> list[str]:
    """'Index Scan using intent_pending_free' ... for every node that reads the intent table."""
    found = []
    if node.get("Relation Name") == "intent":
        index = node.get("Index Name")
        found.append(f"{node['Node Type']} using {index}" if index else node["Node Type"])
    for child in node.get("Plans", []):
        found += _scans(child)
    return found


async def _sample_rss(proc: WorkerProcess, state: _Drain, t0: float) -> None:
    process = psutil.Process(proc.pid)
    while True:
        handled = (await proc.info())["handled"]
        state.samples.append((time.monotonic() - t0, process.memory_info().rss / _MB, handled))
        if handled >= state.total / 2:
            state.halfway.set()
        if handled >= state.total and state.producing_done:
            state.done.set()
            return
        await anyio.sleep(_SAMPLE_EVERY)


async def _claim_halfway(ctx: Context, inst: Installed, state: _Drain) -> None:
    """The claim's plan again half-way, with half a million claimed and sent rows behind the
    head of the pending index (dead entries there until vacuum)."""
    await state.halfway.wait()
    async with ctx.admin() as conn:
        state.claim_halfway = await _claim_plan(conn, inst, 100)


async def _time_queries(ctx: Context, inst: Installed, state: _Drain) -> None:
    """The dashboard's health query four times a second, ``status`` every two seconds."""
    health = load_queries(inst.names)["db_health"]
    async with ctx.admin() as conn:
        next_status = 0.0
        while not state.done.is_set():
            began = time.monotonic()
            await conn.fetchrow(health, COUNT_CAP, inst.names.schema)
            state.health_ms.append(1000 * (time.monotonic() - began))
            if began >= next_status:
                began = time.monotonic()
                await status(conn, inst.names)
                state.status_ms.append(1000 * (time.monotonic() - began))
                next_status = time.monotonic() + 2.0
            with anyio.move_on_after(0.25):
                await state.done.wait()


async def _flat_out(
    ctx: Context, inst: Installed
) -> tuple[producers.ClosedLoopResult, dict[str, float]]:
    """Producers commit flat out for ``backlog_producer_seconds``: (the commits, what their
    server processes were doing, as shares of samples taken every 10 ms: "Lock" is a
    heavyweight lock, "IO"/"LWLock" mostly the WAL flush, "Client" waiting for the producer
    process itself, "CPU" running)."""
    tagged = Installed(_with_app_name(inst.dsn, _PRODUCER_APP), inst.names)
    waits: Counter[str] = Counter()
    async with (
        RelaySystem().producers(tagged, ctx.size.backlog_producers) as produce,
        ctx.admin() as conn,
        anyio.create_task_group() as tg,
    ):

        async def sample() -> None:
            while True:
                for row in await conn.fetch(query("producer_waits"), _PRODUCER_APP):
                    waits[row["what"]] += row["n"]
                await anyio.sleep(0.01)

        tg.start_soon(sample)
        result = await producers.flat_out(produce, ctx.size.backlog_producer_seconds)
        tg.cancel_scope.cancel()
    total = sum(waits.values()) or 1
    return result, {k: 100 * n / total for k, n in waits.items()}


def _with_app_name(dsn: str, name: str) -> str:
    """asyncpg passes unknown DSN parameters on as server settings."""
    parts = urlsplit(dsn)
    query_text = "&".join(filter(None, [parts.query, urlencode({"application_name": name})]))
    return urlunsplit(parts._replace(query=query_text))


async def _produce(
    ctx: Context, inst: Installed, state: _Drain
) -> tuple[producers.ClosedLoopResult, dict[str, float]]:
    """Producers flat out a second into the drain; their intents join the backlog."""
    await anyio.sleep(1.0)
    result, waits = await _flat_out(ctx, inst)
    state.total += result.commits
    state.producing_done = True
    return result, waits


def _waits(shares: dict[str, float]) -> dict[str, float]:
    """The producers' server processes: % of samples waiting on a lock, on the WAL (IO and
    lightweight locks), on the producer process (Client), or running (CPU)."""
    return {
        "lock_pct": shares.get("Lock", 0.0),
        "wal_pct": shares.get("IO", 0.0) + shares.get("LWLock", 0.0),
        "client_pct": shares.get("Client", 0.0),
        "cpu_pct": shares.get("CPU", 0.0),
    }


async def measure(ctx: Context) -> tuple[dict[str, float], list[tuple[float, float, int]], str]:
    size = ctx.size
    relay = RelaySystem()
    async with relay.install(ctx.dsn) as inst, ctx.admin() as conn:
        began = time.monotonic()
        await conn.execute(query("seed_sent", inst.names), size.backlog_sent, "bench")
        await conn.execute(query("seed", inst.names), size.backlog_pending, "bench")
        seed_s = time.monotonic() - began
        await conn.execute(query("analyze_intent", inst.names))
        claim_ms, scans = await _claim_plan(conn, inst, 100)
        alone, alone_waits = await _flat_out(ctx, inst)
        state = _Drain(total=size.backlog_pending + alone.commits)
        async with worker_process(
            "relay",
            ctx.log_dir,
            **relay.worker_config(inst),
            concurrency=size.backlog_concurrency,
            listen=True,
            per_intent=False,
        ) as proc:
            rss_ready = psutil.Process(proc.pid).memory_info().rss / _MB
            running = await proc.go()
            async with anyio.create_task_group() as tg:
                tg.start_soon(_sample_rss, proc, state, running["t0"])
                tg.start_soon(_time_queries, ctx, inst, state)
                tg.start_soon(_claim_halfway, ctx, inst, state)
                during, during_waits = await _produce(ctx, inst, state)
            done = await wait_until_false(conn, relay.unfinished_sql(inst), timeout=600)
            await proc.stop()
    elapsed = done - running["t0"]
    figures = {
        "intents_per_s": state.total / elapsed,
        "seconds": elapsed,
        "seed_s": seed_s,
        "claim_ms": claim_ms,
        "claim_halfway_ms": state.claim_halfway[0],
        "index_scan": 0.0 if "Seq Scan" in scans + state.claim_halfway[1] else 1.0,
        **_memory(rss_ready, state),
        "health_p50_ms": statistics.median(state.health_ms),
        "health_p99_ms": percentile(sorted(state.health_ms), 99),
        "health_max_ms": max(state.health_ms),
        "health_samples": float(len(state.health_ms)),
        "status_p50_ms": statistics.median(state.status_ms),
        "status_p99_ms": percentile(sorted(state.status_ms), 99),
        "status_max_ms": max(state.status_ms),
        "status_samples": float(len(state.status_ms)),
        "commits_alone_per_s": alone.commits / alone.elapsed,
        "commits_draining_per_s": during.commits / during.elapsed,
        **{f"alone_{k}": v for k, v in _waits(alone_waits).items()},
        **{f"draining_{k}": v for k, v in _waits(during_waits).items()},
    }
    return figures, state.samples, f"start: {scans}; half-way: {state.claim_halfway[1]}"


def _memory(rss_ready: float, state: _Drain) -> dict[str, float]:
    """RSS when set up, a quarter of the way through, at its peak, and at the end."""
    rss = [mb for _t, mb, _n in state.samples]
    quarter = next((mb for _t, mb, n in state.samples if n >= state.total / 4), rss[-1])
    return {
        "rss_start_mb": rss_ready,
        "rss_quarter_mb": quarter,
        "rss_peak_mb": max(rss),
        "rss_end_mb": rss[-1],
    }


def _curve(samples: list[tuple[float, float, int]]) -> list[Row]:
    """About ``_CURVE_POINTS`` evenly spaced samples (the peak among them)."""
    step = max(1, len(samples) // _CURVE_POINTS)
    picked = samples[::step]
    peak = max(samples, key=lambda s: s[1])
    if peak not in picked:
        picked = sorted([*picked, peak])
    if samples[-1] not in picked:
        picked.append(samples[-1])
    rows = []
    previous = (0.0, 0.0, 0)
    for t, mb, handled in picked:
        rate = (handled - previous[2]) / (t - previous[0]) if t > previous[0] else 0.0
        row = Row("backlog", f"t = {t:6.1f} s", {"test": "rss", "t": t})
        row.add({"rss_mb": mb, "drained": float(handled), "intents_per_s": rate})
        rows.append(row)
        previous = (t, mb, handled)
    return rows


def plot_rss(path: Path, samples: list[tuple[float, float, int]]) -> bool:
    """The RSS curve with the drained count, as a PNG (False without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, left = plt.subplots(figsize=(8, 4))
    left.plot([s[0] for s in samples], [s[1] for s in samples], color="tab:blue")
    left.set_xlabel("seconds into the drain")
    left.set_ylabel("worker RSS (MB)", color="tab:blue")
    left.set_ylim(0, 1.3 * max(s[1] for s in samples))
    right = left.twinx()
    right.plot([s[0] for s in samples], [s[2] for s in samples], color="tab:gray", ls="--")
    right.set_ylabel("intents drained", color="tab:gray")
    fig.suptitle("outbox-worker: RSS while one worker drains a backlog")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


async def run(ctx: Context) -> list[Row]:
    size = ctx.size
    what = f"{size.backlog_pending:,} pending + {size.backlog_sent:,} sent"
    drain = Row("backlog", f"{what}, concurrency {size.backlog_concurrency}", {"test": "drain"})
    memory = Row("backlog", f"worker draining {what}", {"test": "memory"})
    health = Row("backlog", "dashboard health query (db_health)", {"test": "during"})
    stat = Row("backlog", "`outbox-worker status` (exact counts)", {"test": "during"})
    n = size.backlog_producers
    alone = Row("backlog", f"{n} producers flat out, no worker running", {"test": "during"})
    draining = Row("backlog", f"{n} producers flat out, worker draining", {"test": "during"})
    samples: list[tuple[float, float, int]] = []
    for run_no in range(min(ctx.runs, size.backlog_runs_at_most)):
        ctx.progress(f"backlog run {run_no + 1}: {what}")
        figures, samples, scans = await measure(ctx)
        drain.add({k: figures[k] for k in DRAIN})
        drain.notes["claim_scans"] = scans
        memory.notes["samples"] = samples  # (seconds, RSS MB, drained), every 0.5 s
        memory.add({k: figures[k] for k in MEMORY})
        for row, prefix in ((health, "health"), (stat, "status")):
            row.add(
                {m: figures[f"{prefix}_{m}"] for m in ("p50_ms", "p99_ms", "max_ms", "samples")}
            )
        base = figures["commits_alone_per_s"]
        waits = {
            which: {w: figures[f"{which}_{w}"] for w in WAITS} for which in ("alone", "draining")
        }
        alone.add({"commits_per_s": base, "vs_no_drain": 1.0, **waits["alone"]})
        draining.add(
            {
                "commits_per_s": figures["commits_draining_per_s"],
                "vs_no_drain": figures["commits_draining_per_s"] / base,
                **waits["draining"],
            }
        )
    if plot_rss(ctx.log_dir.parent / "backlog-rss.png", samples):
        ctx.progress(f"plot: {ctx.log_dir.parent / 'backlog-rss.png'}")
    return [drain, memory, health, stat, alone, draining, *_curve(samples)]
