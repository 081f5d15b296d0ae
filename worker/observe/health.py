"""Reads the database side of the dashboard: one cheap query, at most once a second."""

from __future__ import annotations

import logging

import anyio
import asyncpg

from worker.logs import one_line
from worker.observe.stats import Stats
from worker.store.db import DB_UNAVAILABLE
from worker.store.grants import NO_PRIVILEGE, grants_hint
from worker.store.queries import Store

log = logging.getLogger("outbox.health")

# Counts stop here (the dashboard shows "10,000+"): bounded cost whatever the backlog.
COUNT_CAP = 10_000
MIN_INTERVAL = 1.0
# A health read must never queue behind the relay for long or hold a connection it needs.
QUERY_TIMEOUT = 2.0
_READ_FAILED: tuple[type[BaseException], ...] = (*DB_UNAVAILABLE, asyncpg.PostgresError)


class HealthMonitor:
    """Feeds ``Stats.on_db_health`` every ``interval`` seconds (never more than once a
    second) until cancelled. A failed read is shown, not raised: the dashboard must keep
    working while the database is away."""

    def __init__(self, pool: asyncpg.Pool, store: Store, stats: Stats) -> None:
        self._pool = pool
        self._store = store
        self._stats = stats
        self._schema = store.names.schema

    async def run(self, interval: float = MIN_INTERVAL) -> None:
        interval = max(interval, MIN_INTERVAL)
        while True:
            await self.refresh()
            await anyio.sleep(interval)

    async def refresh(self) -> None:
        try:
            health = await self._store.db_health(self._pool, cap=COUNT_CAP, timeout=QUERY_TIMEOUT)
        except asyncpg.InsufficientPrivilegeError as exc:
            # The database answered: it is a grant that is missing, not the database.
            self._stats.on_db_health_failed(f"{NO_PRIVILEGE}: {exc} ({grants_hint(self._schema)})")
            log.debug("database health read refused: %s", exc)
        except _READ_FAILED as exc:
            self._stats.on_db_health_failed(one_line(exc))
            log.debug("database health read failed: %s", one_line(exc))
        else:
            self._stats.on_db_health(health)
