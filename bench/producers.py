"""Producers: connections that commit one intent per transaction, on a schedule or flat out.

Each system is fed through its own public enqueue API (the relay: ``worker.producer.enqueue``),
one autocommitted statement per intent; the commit time is taken when it has returned.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import anyio
import asyncpg
import orjson

from worker.producer import enqueue
from worker.store.sqlfiles import Names

Enqueue = Callable[[int], Awaitable[None]]  # commits the intent carrying key k


@contextlib.asynccontextmanager
async def _one_connection_each(
    dsn: str, n: int, bind: Callable[[asyncpg.Connection], Enqueue]
) -> AsyncIterator[list[Enqueue]]:
    """``n`` producers, each an enqueue function bound to a connection of its own."""
    conns = [await asyncpg.connect(dsn) for _ in range(n)]
    try:
        yield [bind(c) for c in conns]
    finally:
        for conn in conns:
            await conn.close()


@contextlib.asynccontextmanager
async def relay_producers(
    dsn: str, names: Names, n: int, *, keys: int = 0
) -> AsyncIterator[list[Enqueue]]:
    """``keys``: intent k goes on ordering key ``k{k % keys}`` (0: unordered)."""

    def bind(conn: asyncpg.Connection) -> Enqueue:
        # One autocommitted statement: a transaction of its own, in one round trip, so the
        # producer's client overhead hides as little of the server's commit cost as possible.
        async def one(k: int) -> None:
            key = f"k{k % keys}" if keys else None
            await enqueue(conn, "bench", {"k": k}, ordering_key=key, schema=names.schema)

        return one

    async with _one_connection_each(dsn, n, bind) as producers:
        yield producers


@contextlib.asynccontextmanager
async def pgqueuer_producers(
    dsn: str, schema: str, channel: str, n: int
) -> AsyncIterator[list[Enqueue]]:
    from pgqueuer import AsyncpgDriver

    from bench.child import pgqueuer_queries

    def bind(conn: asyncpg.Connection) -> Enqueue:
        queries = pgqueuer_queries(AsyncpgDriver(conn), schema, channel)

        async def one(k: int) -> None:
            await queries.enqueue("bench", orjson.dumps({"k": k}))

        return one

    async with _one_connection_each(dsn, n, bind) as producers:
        yield producers


@contextlib.asynccontextmanager
async def procrastinate_producers(dsn: str, schema: str, n: int) -> AsyncIterator[list[Enqueue]]:
    from bench.child import procrastinate_app

    app = procrastinate_app(dsn, schema, "procrastinate producer", n)
    async with app.open_async():
        deferrer = app.configure_task(name="bench")

        async def one(k: int) -> None:
            await deferrer.defer_async(k=k)

        yield [one] * n


@dataclass
class OpenLoopResult:
    commits: dict[int, float]  # key -> monotonic time the commit returned
    achieved_rate: float


async def at_rate(producers: list[Enqueue], rate: float, duration: float) -> OpenLoopResult:
    """Commit ``rate`` intents per second for ``duration`` seconds on a fixed schedule (an
    open loop: a slow commit does not delay the next intent's due time, so falling behind
    shows as a lower achieved rate instead of hiding)."""
    total = max(1, round(rate * duration))
    keys = itertools.count()
    commits: dict[int, float] = {}
    t0 = time.monotonic() + 0.05

    async def loop(one: Enqueue) -> None:
        while (k := next(keys)) < total:
            delay = t0 + k / rate - time.monotonic()
            if delay > 0:
                await anyio.sleep(delay)
            await one(k)
            commits[k] = time.monotonic()

    async with anyio.create_task_group() as tg:
        for one in producers:
            tg.start_soon(loop, one)
    elapsed = max(commits.values()) - t0 if commits else 0.0
    return OpenLoopResult(commits, len(commits) / elapsed if elapsed > 0 else 0.0)


@dataclass
class ClosedLoopResult:
    commits: int
    elapsed: float
    durations: list[float]  # seconds, one per transaction


async def flat_out(producers: list[Enqueue], duration: float) -> ClosedLoopResult:
    """Every producer commits back to back for ``duration`` seconds."""
    durations: list[float] = []
    keys = itertools.count()
    start = time.monotonic()
    deadline = start + duration

    async def loop(one: Enqueue) -> None:
        while (begin := time.monotonic()) < deadline:
            await one(next(keys))
            durations.append(time.monotonic() - begin)

    async with anyio.create_task_group() as tg:
        for one in producers:
            tg.start_soon(loop, one)
    return ClosedLoopResult(len(durations), time.monotonic() - start, durations)
