"""The claim loop: take due rows for the free delivery slots, then sleep until told.

Where is a row claimed? Here, in ``_claim`` (the SQL is ``claim`` in worker/store/sql/relay.sql).
It takes at most as many rows as there are free slots (and room under the bound on rows held,
worker/relay/inflight.py), in one autocommitted statement on a connection of its own, and hands
them to the dispatcher. When the claim comes back full
it claims again at once; when the backlog is drained it lingers, then declares the worker
idle (producers notify only then) and waits for a notification, the poll, or the next
scheduled row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import suppress

import anyio
import asyncpg

from worker.backoff import jittered
from worker.intent import Intent
from worker.observe.outage import RETRY_CAP, Outage
from worker.observe.stats import Stats
from worker.relay.dispatch import Dispatcher
from worker.relay.inflight import InFlight
from worker.relay.leases import Leases
from worker.relay.listener import Listener
from worker.relay.wakeup import Wakeup
from worker.settings import Settings
from worker.store.connection import DedicatedConnection
from worker.store.db import DB_UNAVAILABLE
from worker.store.queries import FULL_SCAN, Floor, Store

log = logging.getLogger("outbox.claimer")


class Claimer:
    def __init__(
        self,
        *,
        conn: DedicatedConnection,
        store: Store,
        settings: Settings,
        worker_id: str,
        wakeup: Wakeup,
        stats: Stats,
        dispatcher: Dispatcher,
        rows: InFlight,
        leases: Leases,
        listener: Listener | None,
        saturated_kinds: Callable[[], list[str]],
    ) -> None:
        self._conn = conn
        self._store = store
        self._settings = settings
        self._worker_id = worker_id
        self._wakeup = wakeup
        self._stats = stats
        self._dispatcher = dispatcher
        self._rows = rows
        self._leases = leases
        self._listener = listener
        self._saturated_kinds = saturated_kinds
        self._idle_flag_pid: int | None = None
        self._stopping = False
        # Claims start at a floor below which nothing was pending (see ``claim`` in
        # worker/store/sql/relay.sql), with a full scan at least once a poll interval.
        self._floor = FULL_SCAN
        self._next_full_scan = 0.0
        self._keyed_in_flight = False

    def stop(self) -> None:
        self._stopping = True
        self._wakeup.set()
        self._dispatcher.interrupt()
        self._rows.interrupt()

    async def run(self) -> None:
        """Claim while there is work; when drained, linger, then declare idle and sleep.

        Lingering (claiming again after ``linger`` seconds) keeps a worker fed by a steady
        stream busy without a notification per intent; only when a linger finds nothing
        does it ask producers to notify it (see triggers/010_notify_on_commit.sql).
        """
        settings = self._settings
        # Retry at least as often as we poll, so recovery after an outage of any length
        # is as prompt as an idle worker's pickup; any reconnect elsewhere in the worker
        # (listener, outcome writer) sets the wake-up and cuts the wait short.
        outage = Outage(log, "claim loop", cap=min(RETRY_CAP, max(1.0, settings.poll_interval)))
        next_sweep = 0.0
        while not self._stopping:
            if self._dispatcher.free == 0:
                await self._dispatcher.wait_for_free()
                continue
            try:
                if anyio.current_time() >= next_sweep:
                    await self._sweep()
                    next_sweep = anyio.current_time() + max(
                        settings.poll_interval, settings.lease / 4
                    )
                if self._rows.room <= 0:  # backpressure: the outcome writer is behind
                    # Till the next sweep at most: rescues go on while claims wait.
                    await self._rows.wait_for_room(next_sweep - anyio.current_time())
                    continue
                got, full = await self._claim_and_dispatch()
                outage.recovered()
                if full:
                    continue
                # Linger only after activity: a poll that found nothing goes back to sleep
                # (one claim per poll interval when idle).
                if settings.linger > 0 and (got or not self.idle_declared):
                    await self._wakeup.wait(settings.linger)
                    got, _ = await self._claim_and_dispatch()
                    if got or self._stopping:
                        await self._declare_busy()
                        continue
                # Once idle is declared, producers that decided not to notify have committed:
                # look once more, or their intents would wait for the poll.
                if not self.idle_declared and await self._declare_idle():
                    got, _ = await self._claim_and_dispatch()
                    if got:
                        continue
                await self._wait_for_work()
            except asyncpg.UniqueViolationError:
                # Two intents of one ordering key would have been in flight (a lower id that
                # committed late); the database refused the whole claim. Claim again.
                log.info("claim refused by intent_ordering_in_flight; claiming again")
                await self._wakeup.wait(0.01)
            except DB_UNAVAILABLE as exc:
                self._stats.on_db_error("claim")
                await self._wakeup.wait(outage.failed(exc))
        # If the database is gone, the flag is swept once its LISTEN connection is too.
        with anyio.CancelScope(shield=True), anyio.move_on_after(2), suppress(*DB_UNAVAILABLE):
            await self._declare_busy()

    async def _claim_and_dispatch(self) -> tuple[int, bool]:
        """Claim for the free slots and hand the rows over. Returns how many were claimed
        and whether the claim came back full (more may be waiting: claim again at once)."""
        want = min(self._dispatcher.free, self._rows.room, self._settings.batch_size)
        if want == 0:
            return 0, True
        intents = await self._claim(want)
        if intents:
            self._dispatcher.dispatch(intents)
        return len(intents), len(intents) == want

    def _claim_floor(self) -> Floor:
        """Where this claim starts: the floor, or nothing (a full scan) once a poll interval
        and while keyed intents are in flight here or were at the last claim: the outcome
        that frees a key lets its next row, held with its old run_at, back in below the
        floor."""
        now = anyio.current_time()
        keyed = any(i.ordering_key is not None for i in self._rows.held.values())
        full = keyed or self._keyed_in_flight or now >= self._next_full_scan
        self._keyed_in_flight = keyed
        if now >= self._next_full_scan:
            self._next_full_scan = now + self._settings.poll_interval
        return FULL_SCAN if full else self._floor

    async def _claim(self, limit: int) -> list[Intent]:
        # Shielded: a claim cancelled after the server committed it would strand its rows
        # until their lease expired.
        with anyio.CancelScope(shield=True):
            intents, floor = await self._store.claim_from(
                self._conn,
                self._claim_floor(),
                worker_id=self._worker_id,
                lease=self._settings.lease,
                limit=limit,
                skip_kinds=self._saturated_kinds(),
                default_max_attempts=self._settings.max_attempts,
            )
        if floor is not None:
            self._floor = floor
        if not intents:
            return []
        self._rows.claimed(intents)
        self._stats.on_claim(len(intents))
        return intents

    # --- idle or busy ----------------------------------------------------------------------

    @property
    def idle_declared(self) -> bool:
        """Producers notify on our account (our flag row matches the live LISTEN backend)."""
        pid = self._listener.backend_pid if self._listener else None
        return pid is not None and self._idle_flag_pid == pid

    async def _declare_idle(self) -> bool:
        pid = self._listener.backend_pid if self._listener else None
        if pid is None:  # nobody would hear a notification: rely on the poll
            return False
        await self._store.declare_idle(self._conn, pid, self._worker_id)
        self._idle_flag_pid = pid
        self._stats.on_idle(True)
        return True

    async def _declare_busy(self) -> None:
        if self._idle_flag_pid is None:
            return
        await self._store.declare_busy(self._conn, self._idle_flag_pid)
        self._idle_flag_pid = None
        self._stats.on_idle(False)

    # --- waiting ---------------------------------------------------------------------------

    async def _sweep(self) -> None:
        """Periodic housekeeping: expired leases back to pending, stale idle flags away."""
        self._stats.on_rescued(await self._leases.rescue_expired(self._conn))
        await self._store.sweep_idle_workers(self._conn)

    async def _wait_for_work(self) -> None:
        timeout = jittered(self._settings.poll_interval)
        try:
            due_in = await self._store.next_due(self._conn, self._floor)
        except DB_UNAVAILABLE:
            due_in = None
        if due_in is not None:
            # Something is scheduled (a retry, a run_at in the future): wake when it falls
            # due. Rows that are due already but were skipped are being claimed by another
            # worker right now; look again shortly rather than spin.
            timeout = min(timeout, max(due_in, 0.05))
            # Due rows we could not claim: other workers hold them, or they wait behind the
            # head of their ordering key. Mark the latter out of the claim's way; if any were,
            # claim again at once (a long backlog behind one key takes a pass per 1,000).
            if due_in <= 0 and await self._store.hold_backlog(self._conn, 1000, self._floor):
                return
        if not await self._wakeup.wait(timeout):
            self._stats.on_poll()
            self._next_full_scan = 0.0  # a poll looks everywhere
