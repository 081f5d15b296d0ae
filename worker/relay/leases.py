"""The leases of the rows this worker holds (inflight.py owns the rows): kept alive by a
heartbeat, and the rescue of rows whose lease ran out (their worker crashed, hung or lost
the database)."""

from __future__ import annotations

import logging

import anyio
import asyncpg

from worker.observe.outage import Outage
from worker.observe.stats import Stats
from worker.relay.inflight import InFlight
from worker.store.db import DB_UNAVAILABLE
from worker.store.queries import Conn, Store

log = logging.getLogger("outbox.leases")


class Leases:
    def __init__(
        self,
        pool: asyncpg.Pool,
        store: Store,
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
        self._store = store
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
                gone = await self._store.heartbeat(self._pool, self._worker_id, ids, self._lease)
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
            lost = sorted(i for i in gone if delivering(i))
            if lost:  # counted in the stats when their fenced outcome write is refused
                log.warning(
                    "lost the lease of intents %s; their outcomes will be discarded", lost[:10]
                )

    async def rescue_expired(self, conn: Conn) -> int:
        """Expired leases of any worker back to pending (or dead: a rescue is an attempt).
        Returns how many."""
        statuses = await self._store.rescue_expired(
            conn, max_attempts=self._max_attempts, keep=self._rows.held, skip_dead=self._skip_dead
        )
        if statuses:
            log.warning(
                "rescued %d intents whose lease expired (%d of them now dead)",
                len(statuses),
                statuses.count("dead"),
            )
        return len(statuses)
