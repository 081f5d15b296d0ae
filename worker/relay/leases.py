"""The leases of the rows this worker holds (inflight.py owns the rows): kept alive by a
heartbeat, and the rescue of rows whose lease ran out (their worker crashed, hung or lost
the database)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import anyio
import asyncpg

from worker.observe.outage import Outage
from worker.observe.stats import Stats
from worker.relay.inflight import InFlight
from worker.relay.outcomes import Fetcher
from worker.store.db import DB_UNAVAILABLE

log = logging.getLogger("outbox.leases")


class Leases:
    def __init__(
        self,
        pool: asyncpg.Pool,
        queries: Mapping[str, str],
        worker_id: str,
        rows: InFlight,
        *,
        lease: float,
        max_attempts: int,
        skip_dead: bool = False,  # --ordering-on-dead continue
        stats: Stats,
    ) -> None:
        self._rows = rows  # read only: what is held is InFlight's to change
        self._stats = stats
        self._pool = pool
        self._q = queries
        self._worker_id = worker_id
        self._lease = lease
        self._max_attempts = max_attempts
        self._skip_dead = skip_dead

    async def heartbeat(self) -> None:
        """Every lease/3: extend the lease of every row held, its outcome waiting in the
        writer's queue or not. The statement is fenced (ours and still processing), so a row
        whose outcome lands first is left alone; a row the writer holds locked is skipped."""
        outage = Outage(log, "heartbeat", cap=self._lease / 3)  # it keeps its own pace
        while True:
            await anyio.sleep(self._lease / 3)
            ids = list(self._rows.held)
            if not ids:
                continue
            try:
                rows = await self._pool.fetch(
                    self._q["heartbeat"], self._worker_id, ids, self._lease
                )
            except DB_UNAVAILABLE as exc:
                self._stats.on_db_error("heartbeat")
                # Logged once per outage; the heartbeat keeps its own pace (lease/3).
                outage.failed(exc, f"; heartbeat failed, leases expire in <= {self._lease:g}s")
                if isinstance(exc, asyncpg.ReadOnlySQLTransactionError):
                    # Pooled connections on a server that stopped taking writes: reconnect
                    # them, through the DSN's hosts, to the one that does.
                    await self._pool.expire_connections()
                continue
            outage.recovered()
            # Still delivering and no longer ours: another worker has taken the row over. (Not
            # ours with its outcome waiting: recorded meanwhile, or the fenced write tells.)
            delivering = self._rows.delivering
            lost = [r["id"] for r in rows if not r["renewed"] and delivering(r["id"])]
            if lost:  # counted in the stats when their fenced outcome write is refused
                log.warning(
                    "lost the lease of intents %s; their outcomes will be discarded", lost[:10]
                )

    async def rescue_expired(self, conn: Fetcher) -> int:
        """Expired leases of any worker back to pending (or dead: a rescue is an attempt).
        Returns how many."""
        rows = await conn.fetch(
            self._q["rescue_expired"], self._max_attempts, list(self._rows.held), self._skip_dead
        )
        if rows:
            dead = sum(1 for r in rows if r["status"] == "dead")
            log.warning(
                "rescued %d intents whose lease expired (%d of them now dead)", len(rows), dead
            )
        return len(rows)
