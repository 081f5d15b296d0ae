"""6. Email: intents/s delivered to a local SMTP sink, pooled connections (the relay's
EmailSink) against a naive sink that opens one connection per email (aiosmtplib.send)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator

import anyio
import asyncpg

from bench.context import Context
from bench.drive import drain_once
from bench.figures import Row
from bench.sql import query
from bench.systems import Installed, RelaySystem

TITLE = "Email to a local SMTP sink (the same relay; pooled EmailSink vs one connection per email)"
METRICS = ("intents_per_s", "vs_naive", "worker_cpu")
SINKS = {
    "email": "EmailSink (pooled connections)",
    "naive_email": "naive: aiosmtplib.send per email",
}


@contextlib.asynccontextmanager
async def smtp_sink() -> AsyncIterator[int]:
    process = await anyio.open_process(
        [sys.executable, "-m", "bench.smtp_sink"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        with anyio.fail_after(30):
            line = b""
            async for chunk in process.stdout:
                line += chunk
                if b"\n" in line:
                    break
        yield int(line.split()[0])
    finally:
        with anyio.CancelScope(shield=True):
            if process.stdin is not None:
                await process.stdin.aclose()
            with anyio.move_on_after(5):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


async def _seed(conn: asyncpg.Connection, inst: Installed, n: int) -> None:
    await conn.execute(query("seed_email", inst.names), n)


async def run(ctx: Context) -> list[Row]:
    relay = RelaySystem()
    rows = {
        (sink, c): Row("email", f"{label}, concurrency {c}", {"sink": sink, "concurrency": c})
        for c in ctx.size.email_concurrency
        for sink, label in SINKS.items()
    }
    async with smtp_sink() as port:
        for run_no in range(ctx.runs):
            for c in ctx.size.email_concurrency:
                results = {}
                for sink in SINKS:
                    ctx.progress(f"email run {run_no + 1}: {sink}, concurrency {c}")
                    results[sink] = await drain_once(
                        ctx,
                        relay,
                        ctx.size.email_intents,
                        seed=_seed,
                        sink=sink,
                        concurrency=c,
                        batch_size=100,
                        poll_interval=2.0,
                        listen=True,
                        smtp_url=f"smtp://127.0.0.1:{port}?tls=none",
                        smtp_host="127.0.0.1",
                        smtp_port=port,
                    )
                for sink, figures in results.items():
                    figures["vs_naive"] = (
                        figures["intents_per_s"] / results["naive_email"]["intents_per_s"]
                    )
                    rows[sink, c].add(figures)
    return list(rows.values())
