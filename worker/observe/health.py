"""Reads the database side of the dashboard: one cheap query, at most once a second."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import anyio
import asyncpg

from worker.logs import one_line
from worker.observe.stats import DbHealth, Stats
from worker.store.db import DB_UNAVAILABLE

log = logging.getLogger("outbox.health")

# Counts stop here (the dashboard shows "10,000+"): bounded cost whatever the backlog.
COUNT_CAP = 10_000
MIN_INTERVAL = 1.0
# A health read must never queue behind the relay for long or hold a connection it needs.
QUERY_TIMEOUT = 2.0
_READ_FAILED: tuple[type[BaseException], ...] = (*DB_UNAVAILABLE, asyncpg.PostgresError)


async def read_db_health(
    pool: asyncpg.Pool, query: str, schema: str, *, cap: int = COUNT_CAP
) -> DbHealth:
    row = await pool.fetchrow(query, cap, schema, timeout=QUERY_TIMEOUT)
    assert row is not None  # the query always returns exactly one row
    waited = row["oldest_pending_run_at_age"]
    return DbHealth(
        pending_due=row["pending_due"],
        pending_later=row["pending_later"],
        pending_held=row["pending_held"],
        processing=row["processing"],
        dead=row["dead"],
        count_cap=cap,
        # a negative age is a run_at in the future: nothing is due
        oldest_due_seconds=waited if waited is not None and waited >= 0 else None,
        notify_queue_usage=row["notify_queue_usage"],
        idle_workers=row["idle_workers"],
        live_tuples=row["live_tuples"],
        dead_tuples=row["dead_tuples"],
        last_autovacuum_seconds=row["last_vacuum_age"],
        table_bytes=row["table_bytes"],
        oldest_xact_seconds=row["oldest_xact_age"],
        oldest_xact_pid=row["oldest_xact_pid"],
        oldest_xact_application=row["oldest_xact_application"] or None,
        halted_keys=row["halted_keys"],
        oldest_halted_key=row["oldest_halted_key"],
        oldest_halted_seconds=row["oldest_halted_age"],
        server=server_label(row),
    )


def server_label(row: asyncpg.Record) -> str:
    """The server a connection is on, as the ``server`` query (or db_health) reads it:
    ``127.0.0.1:5433 (primary)``; after a failover, the promoted standby's address."""
    where = row["server_addr"] or "local socket"
    role = "primary" if row["server_primary"] else "standby, read-only"
    return f"{where}:{row['server_port']} ({role})"


class HealthMonitor:
    """Feeds ``Stats.on_db_health`` every ``interval`` seconds (never more than once a
    second) until cancelled. A failed read is shown, not raised: the dashboard must keep
    working while the database is away."""

    def __init__(
        self, pool: asyncpg.Pool, queries: Mapping[str, str], schema: str, stats: Stats
    ) -> None:
        self._pool = pool
        self._query = queries["db_health"]
        self._schema = schema
        self._stats = stats

    async def run(self, interval: float = MIN_INTERVAL) -> None:
        interval = max(interval, MIN_INTERVAL)
        while True:
            await self.refresh()
            await anyio.sleep(interval)

    async def refresh(self) -> None:
        try:
            health = await read_db_health(self._pool, self._query, self._schema)
        except _READ_FAILED as exc:
            self._stats.on_db_health_failed(one_line(exc))
            log.debug("database health read failed: %s", one_line(exc))
        else:
            self._stats.on_db_health(health)
