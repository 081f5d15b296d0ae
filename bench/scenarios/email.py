"""6. Email: intents/s delivered to a local SMTP sink, pooled connections (the relay's
EmailSink) against a naive sink that opens one connection per email (aiosmtplib.send)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator
from urllib.parse import quote

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
async def smtp_sink(starttls: bool) -> AsyncIterator[tuple[int, str | None]]:
    """The sink process; yields its port and, with STARTTLS, the CA file to trust."""
    command = [sys.executable, "-m", "bench.smtp_sink", *(["--starttls"] if starttls else [])]
    process = await anyio.open_process(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        line = b""
        with anyio.fail_after(30):
            async for chunk in process.stdout:
                line += chunk
                if b"\n" in line:
                    break
        port, *cafile = line.split()
        yield int(port), cafile[0].decode() if cafile else None
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
        (tls, sink, c): Row(
            "email",
            f"{'STARTTLS' if tls else 'plain'}: {label}, concurrency {c}",
            {"starttls": tls, "sink": sink, "concurrency": c},
        )
        for tls in (False, True)
        for c in ctx.size.email_concurrency
        for sink, label in SINKS.items()
    }
    for tls in (False, True):
        async with smtp_sink(tls) as (port, cafile):
            url = f"smtp://127.0.0.1:{port}?" + (
                f"tls=starttls&cafile={quote(cafile)}" if cafile else "tls=none"
            )
            for run_no in range(ctx.runs):
                for c in ctx.size.email_concurrency:
                    results = {}
                    for sink in SINKS:
                        ctx.progress(f"email run {run_no + 1}: {rows[tls, sink, c].label}")
                        results[sink] = await drain_once(
                            ctx, relay, ctx.size.email_intents, seed=_seed, sink=sink,
                            concurrency=c, batch_size=100, poll_interval=2.0, listen=True,
                            smtp_url=url, smtp_host="127.0.0.1", smtp_port=port,
                            smtp_cafile=cafile,
                        )  # fmt: skip
                    naive = results["naive_email"]["intents_per_s"]
                    for sink, figures in results.items():
                        figures["vs_naive"] = figures["intents_per_s"] / naive
                        rows[tls, sink, c].add(figures)
    return list(rows.values())
