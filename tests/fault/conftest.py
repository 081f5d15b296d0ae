"""Fixtures for the fault-injection suite: a scriptable SMTP server, worker subprocesses,
and the intent table as the ledger to check them against."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any

import asyncpg
import pytest

from tests.fault.ledger import Outbox
from tests.fault.pgcluster import Cluster, throwaway_cluster
from tests.fault.workers import WorkerProcess, run_args
from tests.smtp_server import SmtpTestServer
from tests.tcp_proxy import TcpProxy

Spawn = Callable[..., Awaitable[WorkerProcess]]


@pytest.fixture
async def smtp() -> AsyncIterator[SmtpTestServer]:
    async with SmtpTestServer() as server:
        yield server


@pytest.fixture
def outbox(db: asyncpg.Connection, schema: str) -> Outbox:
    return Outbox(db, schema)


@pytest.fixture
async def spawn(pg_dsn: str, schema: str, db: asyncpg.Connection) -> AsyncIterator[Spawn]:
    """Start `outbox-worker run` subprocesses on this test's schema; all are killed at the end.

    ``await spawn(smtp_url=..., concurrency=..., extra=[...], dsn=...)``; keyword arguments
    go to ``run_args``. ``args=[...]`` replaces the argument list entirely.
    """
    started: list[WorkerProcess] = []

    async def start(
        *, args: Sequence[str] | None = None, env: dict[str, str] | None = None, **kw: Any
    ) -> WorkerProcess:
        kw.setdefault("dsn", pg_dsn)
        kw.setdefault("schema", schema)
        proc = WorkerProcess(args if args is not None else run_args(**kw), env=env)
        started.append(proc)
        return await proc.start()

    try:
        yield start
    finally:
        for proc in started:
            await proc.aclose()


@pytest.fixture
async def pg_proxy(pg_dsn: str) -> AsyncIterator[TcpProxy]:
    """A TCP proxy in front of the test database, to freeze or cut the workers' network.

    The embedded PostgreSQL listens on a Unix socket only (its cluster trusts every local
    connection, so a TCP port would let any user on the machine in): the proxy then forwards
    to that socket, and the workers still talk TCP to the proxy."""
    async with TcpProxy.to_postgres(pg_dsn) as proxy:
        yield proxy


@pytest.fixture(scope="session")
def own_pg() -> Iterator[Cluster]:
    """A PostgreSQL cluster of the suite's own, for tests that restart or crash the server
    (the shared one is never touched). Password authentication over TCP."""
    with throwaway_cluster() as cluster:
        yield cluster
