"""10. What `--http` costs: the same drain without it, with it but never scraped, and
scraped every second (as Prometheus would) and every 100 ms (ten scrapers). Same round, so
the ratio to the run without --http is fair."""

from __future__ import annotations

import socket

import aiohttp
import anyio

from bench.context import Context
from bench.drive import drain_once
from bench.figures import Row
from bench.systems import RelaySystem

TITLE = "--http overhead (drain, no-op handler, one worker process, concurrency 100, batch 100)"
METRICS = ("intents_per_s", "vs_without", "scrapes", "worker_us_per_intent")
CONCURRENCY = BATCH = 100
# (label, --http on, seconds between scrapes; None: not scraped)
VARIANTS: tuple[tuple[str, bool, float | None], ...] = (
    ("without --http", False, None),
    ("--http, not scraped", True, None),
    ("--http, scraped every 1 s", True, 1.0),
    ("--http, scraped every 0.1 s", True, 0.1),
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _scrape(url: str, every: float, done: list[int]) -> None:
    """GET ``url`` every ``every`` seconds until cancelled; counts the answers."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while True:
            try:
                async with session.get(url) as response:
                    await response.read()
                    done[0] += response.status == 200
            except (aiohttp.ClientError, OSError, TimeoutError):
                pass  # the worker is not listening yet, or already gone
            await anyio.sleep(every)


async def _drain(ctx: Context, n: int, http: bool, every: float | None) -> dict[str, float]:
    address = f"127.0.0.1:{_free_port()}"
    scrapes = [0]
    async with anyio.create_task_group() as tg:
        if every is not None:
            tg.start_soon(_scrape, f"http://{address}/metrics", every, scrapes)
        extra = {"http": address} if http else {}
        figures = await drain_once(
            ctx, RelaySystem(), n, concurrency=CONCURRENCY, batch_size=BATCH, **extra
        )
        tg.cancel_scope.cancel()
    return {**figures, "scrapes": float(scrapes[0])}


async def run(ctx: Context) -> list[Row]:
    n = ctx.size.http_intents
    rows = [
        Row("http", f"{label}, {n:,} intents", {"http": http, "scrape_every": every or 0})
        for label, http, every in VARIANTS
    ]
    for run_no in range(ctx.runs):
        base = None
        # Interleaved: every variant once per round, so drift hits all alike.
        for row, (label, http, every) in zip(rows, VARIANTS, strict=True):
            ctx.progress(f"http run {run_no + 1}: {label}")
            figures = await _drain(ctx, n, http, every)
            base = base or figures["intents_per_s"]
            row.add({**figures, "vs_without": figures["intents_per_s"] / base})
    return rows
