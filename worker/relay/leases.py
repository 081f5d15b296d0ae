"""The rows this worker holds: their leases kept alive by a heartbeat, and the rescue of
rows whose lease ran out (their worker crashed, hung or lost the database)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

import anyio
import asyncpg

from worker.intent import Intent
from worker.observe.outage import Outage
from worker.relay.outcomes import Fetcher
from worker.store.db import DB_UNAVAILABLE

log = logging.getLogger("outbox.leases")


class Leases:
    def __init__(
        self,
        pool: asyncpg.Pool,
        queries: Mapping[str, str],
        worker_id: str,
        *,
        lease: float,
        max_attempts: int,
        skip_dead: bool = False,  # --ordering-on-dead continue
        on_db_error: Callable[[str], None] = lambda _operation: None,
    ) -> None:
        # Rows this worker holds a lease on, from claim until their outcome is recorded.
        self.held: dict[int, Intent] = {}
        # The subset whose outcome is handed to the writer but not yet recorded: the
        # heartbeat leaves them alone (their write may land before its UPDATE).
        self.submitted: set[int] = set()
        self._pool = pool
        self._q = queries
        self._worker_id = worker_id
        self._lease = lease
        self._max_attempts = max_attempts
        self._skip_dead = skip_dead
        self._on_db_error = on_db_error

    def claimed(self, intents: Iterable[Intent]) -> None:
        for intent in intents:
            self.held[intent.id] = intent

    def recorded(self, intent: Intent) -> None:
        self.held.pop(intent.id, None)
        self.submitted.discard(intent.id)

    async def heartbeat(self) -> None:
        """Every lease/3: extend the leases of the rows still being delivered."""
        outage = Outage(log, "heartbeat", cap=self._lease / 3)  # it keeps its own pace
        while True:
            await anyio.sleep(self._lease / 3)
            ids = [i for i in self.held if i not in self.submitted]
            if not ids:
                continue
            try:
                rows = await self._pool.fetch(
                    self._q["heartbeat"], self._worker_id, ids, self._lease
                )
            except DB_UNAVAILABLE as exc:
                self._on_db_error("heartbeat")
                # Logged once per outage; the heartbeat keeps its own pace (lease/3).
                outage.failed(exc, f"; heartbeat failed, leases expire in <= {self._lease:g}s")
                if isinstance(exc, asyncpg.ReadOnlySQLTransactionError):
                    # Pooled connections on a server that stopped taking writes: reconnect
                    # them, through the DSN's hosts, to the one that does.
                    await self._pool.expire_connections()
                continue
            outage.recovered()
            # Still delivering and no longer ours: another worker has taken the row over.
            lost = [
                r["id"]
                for r in rows
                if not r["renewed"] and r["id"] in self.held and r["id"] not in self.submitted
            ]
            if lost:  # counted in the stats when their fenced outcome write is refused
                log.warning(
                    "lost the lease of intents %s; their outcomes will be discarded", lost[:10]
                )

    async def rescue_expired(self, conn: Fetcher) -> int:
        """Expired leases of any worker back to pending (or dead: a rescue is an attempt).
        Returns how many."""
        rows = await conn.fetch(
            self._q["rescue_expired"], self._max_attempts, list(self.held), self._skip_dead
        )
        if rows:
            dead = sum(1 for r in rows if r["status"] == "dead")
            log.warning(
                "rescued %d intents whose lease expired (%d of them now dead)", len(rows), dead
            )
        return len(rows)
