"""The insert trigger notifies only when a worker is idle, and never loses a wake-up.

Absence of a notification is checked without sleeping: notifications arrive in commit
order, so once a marker sent by a later transaction arrives, any earlier one would have.
"""

from __future__ import annotations

import anyio
import asyncpg

from tests.conftest import wait_until
from worker.producer import enqueue
from worker.store.sqlfiles import Names, load_queries


class Inbox:
    def __init__(self) -> None:
        self.payloads: list[str] = []

    def __call__(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self.payloads.append(payload)


async def _listen(pg_dsn: str, names: Names) -> tuple[asyncpg.Connection, Inbox]:
    conn = await asyncpg.connect(pg_dsn)
    inbox = Inbox()
    await conn.add_listener(names.channel, inbox)
    return conn, inbox


async def _received_until_marker(db: asyncpg.Connection, names: Names, inbox: Inbox) -> list[str]:
    await db.execute("SELECT pg_notify($1, 'marker')", names.channel)
    await wait_until(lambda: "marker" in inbox.payloads)
    return inbox.payloads[: inbox.payloads.index("marker")]


async def test_no_idle_worker_means_no_notify(pg_dsn: str, db, names: Names):
    listener, inbox = await _listen(pg_dsn, names)
    try:
        async with db.transaction():
            await enqueue(db, "noop", {}, schema=names.schema)
        assert await _received_until_marker(db, names, inbox) == []
    finally:
        await listener.close()


async def test_idle_worker_gets_one_notification_per_transaction(pg_dsn: str, db, names: Names):
    q = load_queries(names)
    listener, inbox = await _listen(pg_dsn, names)
    try:
        await db.execute(q["declare_idle"], listener.get_server_pid(), "test-worker")
        await db.execute(
            f'INSERT INTO "{names.schema}".intent (kind, payload) '
            "SELECT 'noop', '{}' FROM generate_series(1, 1000)"
        )
        async with db.transaction():
            await enqueue(db, "noop", {}, schema=names.schema)
            await enqueue(db, "noop", {}, schema=names.schema)
        assert await _received_until_marker(db, names, inbox) == ["", ""]
    finally:
        await listener.close()


async def test_declaring_idle_waits_for_a_producer_that_decided_not_to_notify(
    pg_dsn: str, db, names: Names
):
    """The race the advisory lock closes: the producer checked the flag (none yet) and is
    still committing when the worker declares itself idle. The worker must wait for that
    commit, so that its next claim sees the row."""
    q = load_queries(names)
    producer = await asyncpg.connect(pg_dsn)
    worker = await asyncpg.connect(pg_dsn)
    try:
        tx = producer.transaction()
        await tx.start()
        await enqueue(producer, "noop", {}, schema=names.schema)
        # Run the deferred trigger now, as it would run at commit: it checks, finds no idle
        # worker, holds the lock in share mode until the transaction ends.
        await producer.execute("SET CONSTRAINTS ALL IMMEDIATE")
        declared = anyio.Event()

        async def declare() -> None:
            await worker.execute(q["declare_idle"], 4242, "test-worker")
            declared.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(declare)
            await wait_until(
                lambda: db.fetchval(
                    "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1",
                    worker.get_server_pid(),
                )
            )
            assert not declared.is_set()
            await tx.commit()
            with anyio.fail_after(10):
                await declared.wait()
        pending = await db.fetchval(
            f"SELECT count(*) FROM \"{names.schema}\".intent WHERE status = 'pending'"
        )
        assert pending == 1  # visible to the claim that follows the declaration
    finally:
        await producer.close()
        await worker.close()


async def test_producer_notifies_while_a_worker_is_declaring_idle(pg_dsn: str, db, names: Names):
    """The other side: while a worker's declaration is in progress (its flag not yet
    visible), the producer cannot take the lock in share mode, so it notifies."""
    q = load_queries(names)
    listener, inbox = await _listen(pg_dsn, names)
    worker = await asyncpg.connect(pg_dsn)
    try:
        async with worker.transaction():
            await worker.execute(q["declare_idle"], listener.get_server_pid(), "test-worker")
            async with db.transaction():
                await enqueue(db, "noop", {}, schema=names.schema)
        assert await _received_until_marker(db, names, inbox) == [""]
    finally:
        await listener.close()
        await worker.close()


async def test_stale_idle_flags_are_swept(db, names: Names, start_relay):
    await db.execute(
        f'INSERT INTO "{names.schema}".idle_worker (backend_pid, worker_id) VALUES (1, $1)',
        "crashed-worker",
    )
    async with start_relay({}):
        await wait_until(
            lambda: db.fetchval(
                f'SELECT count(*) = 0 FROM "{names.schema}".idle_worker WHERE backend_pid = 1'
            )
        )
