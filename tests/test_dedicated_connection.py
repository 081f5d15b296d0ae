"""DedicatedConnection against a real server: one operation at a time whoever calls it, a
statement's own error keeps the connection, anything that may have broken it reconnects."""

from __future__ import annotations

import contextlib

import anyio
import asyncpg
import pytest

from worker.store.connection import DedicatedConnection
from worker.store.db import DB_UNAVAILABLE


@pytest.fixture
async def dedicated(pg_dsn: str):
    reconnects: list[int] = []
    conn = DedicatedConnection(pg_dsn, "dedicated test", on_reconnect=lambda: reconnects.append(1))
    conn.reconnects = reconnects  # type: ignore[attr-defined]
    yield conn
    await conn.close()


async def test_callers_at_once_take_turns_instead_of_breaking_the_protocol(dedicated) -> None:
    """asyncpg refuses a second statement while one is in flight ("another operation is in
    progress"); the connection serialises them instead."""
    results: list[int] = []

    async def query(n: int) -> None:
        results.append(await dedicated.fetchval("SELECT $1::int FROM pg_sleep(0.02)", n))

    async with anyio.create_task_group() as tg:
        for n in range(8):
            tg.start_soon(query, n)
    assert sorted(results) == list(range(8))
    assert dedicated.reconnects == []


async def test_a_statement_error_keeps_the_connection(dedicated) -> None:
    pid = await dedicated.fetchval("SELECT pg_backend_pid()")
    with pytest.raises(asyncpg.DivisionByZeroError):
        await dedicated.fetchval("SELECT 1 / 0")
    assert await dedicated.fetchval("SELECT pg_backend_pid()") == pid


async def test_a_terminated_backend_is_an_outage_then_a_reconnect(dedicated, db) -> None:
    pid = await dedicated.fetchval("SELECT pg_backend_pid()")
    await db.execute("SELECT pg_terminate_backend($1)", pid)
    # The loss shows as an outage, or not at all if the client saw the socket close first.
    with contextlib.suppress(*DB_UNAVAILABLE):
        await dedicated.fetchval("SELECT 1")
    assert await dedicated.fetchval("SELECT pg_backend_pid()") != pid
    assert dedicated.reconnects == [1]


async def test_a_cancelled_statement_leaves_no_half_used_connection(dedicated) -> None:
    pid = await dedicated.fetchval("SELECT pg_backend_pid()")
    with anyio.move_on_after(0.2):
        await dedicated.execute("SELECT pg_sleep(30)")
    # Whatever state the cancel left the protocol in, the next statement gets a clean one.
    assert await dedicated.fetchval("SELECT 2") == 2
    assert await dedicated.fetchval("SELECT pg_backend_pid()") != pid
