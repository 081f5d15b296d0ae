"""Retention: the worker deletes finished intents past their age, so that the table holds a
day of traffic rather than years of it (--retain-sent, --retain-dead; ``inf``: forever).

A round every ``interval`` walks the table by primary key in windows of ``BATCH`` rows
(worker/store/sql/admin.sql, ``purge``: the same statement as `outbox-worker purge`) and
stops at the first window whose rows are all too young to go, so a round over a table with
nothing to delete reads one window. Never a pending or processing row; never a dead intent
that holds up its ordering key, unless --ordering-on-dead continue.

One deleter at a time, across processes and hosts: each window's statement takes
``pg_try_advisory_xact_lock`` in its own transaction and does nothing without it. Nothing
is held between statements, so it works through a transaction pooler (PgBouncer hands each
statement another server connection, where a session lock would stay behind) and after a
failover (the lock went with the old primary's transactions; the next round takes it on the
new one). A worker that finds the lock taken skips its round: another one is deleting.
"""

from __future__ import annotations

import logging
import math
import random
import time

import anyio

from worker.observe.outage import Outage
from worker.observe.stats import Stats
from worker.store.db import DB_UNAVAILABLE
from worker.store.queries import Conn, Store
from worker.units import fmt_duration

log = logging.getLogger("outbox.retention")

# Rows per window: each DELETE is a short transaction (~10-30 ms for 2,000 rows here), so
# producers' commits never queue behind it for long.
BATCH = 2000
# Between two windows that deleted rows: the WAL writer and autovacuum catch up, and the
# producers' commits get the disk (a deleting round runs at most ~BATCH / PAUSE rows/s).
PAUSE = 0.1
# A row past its retention is gone within about this long (rounds are jittered around it);
# shorter for short retentions (seconds, in tests), never under a second.
MAX_INTERVAL = 30.0
# A round starts where the last one found the first row it kept: below it everything is
# gone, and walking the deleted rows' index entries again (until VACUUM removes them, never
# while an old transaction holds the xmin horizon) would cost more than the round. Every
# FULL_EVERY-th round starts from the beginning: a producer's row that was still
# uncommitted below that floor when a round passed is not left behind for longer.
FULL_EVERY = 10


def round_interval(retain_sent: float, retain_dead: float) -> float:
    return max(1.0, min(MAX_INTERVAL, min(retain_sent, retain_dead) / 2))


class Retention:
    def __init__(
        self,
        conn: Conn,
        store: Store,
        stats: Stats,
        *,
        retain_sent: float,
        retain_dead: float,
        keep_halting: bool,
        batch: int = BATCH,
        pause: float = PAUSE,
    ) -> None:
        self._conn = conn
        self._store = store
        self._stats = stats
        self._sent = None if math.isinf(retain_sent) else retain_sent
        self._dead = None if math.isinf(retain_dead) else retain_dead
        self._keep_halting = keep_halting
        self._batch = batch
        self._pause = pause
        self.interval = round_interval(retain_sent, retain_dead)
        self._rounds = 0
        self._floor = 0  # every id up to here was gone at the last round

    @property
    def enabled(self) -> bool:
        return self._sent is not None or self._dead is not None

    async def run(self) -> None:
        """Rounds until cancelled (with the relay's other services)."""
        if not self.enabled:
            return
        self._stats.retention_enabled = True
        outage = Outage(log, "retention", cap=self.interval)
        # Not all at start-up: workers started together spread their first rounds.
        await anyio.sleep(self.interval * random.uniform(0.1, 0.3))
        while True:
            try:
                await self.round()
            except DB_UNAVAILABLE as exc:
                self._stats.on_db_error("retention")
                outage.failed(exc, "; retention tries again next round")
            else:
                outage.recovered()
            await anyio.sleep(self.interval * random.uniform(0.9, 1.1))

    async def round(self) -> bool:
        """One pass over what is due; False when another deleter held the lock."""
        started = time.monotonic()
        after = self._floor if self._rounds % FULL_EVERY else 0
        sent = dead = 0
        first = True
        floor: int | None = None
        while True:
            batch = await self._store.purge_batch(
                self._conn,
                after=after,
                limit=self._batch,
                sent_older=self._sent,
                dead_older=self._dead,
                keep_halting=self._keep_halting,
                exclusive=True,
            )
            if not batch.got and first:
                self._stats.on_retention_skipped()
                log.debug("retention: another worker is deleting; skipped this round")
                return False
            first = False
            if floor is None and batch.got and (batch.first_kept is not None or batch.last):
                floor = batch.last_id if batch.first_kept is None else batch.first_kept - 1
            sent, dead, after = sent + batch.sent, dead + batch.dead, batch.last_id
            if batch.last:  # the end, rows too young, or another worker took over
                break
            if batch.deleted:
                await anyio.sleep(self._pause)
        self._rounds += 1
        self._floor = self._floor if floor is None else floor
        oldest_sent, oldest_dead = await self._store.oldest_finished(self._conn, self._floor)
        self._stats.on_retention(sent, dead, oldest_sent, oldest_dead)
        if sent or dead:
            log.info(
                "retention: deleted %d sent intents (%s) and %d dead ones (%s) in %.1fs",
                sent,
                _age(self._sent),
                dead,
                _age(self._dead),
                time.monotonic() - started,
            )
        return True


def _age(seconds: float | None) -> str:
    return "kept forever" if seconds is None else f"older than {fmt_duration(seconds)}"
