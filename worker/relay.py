"""The relay: claim committed intents, hand them to delivery slots, record the outcomes.

Data flow: trigger NOTIFY -> Listener sets the Wakeup -> the claim loop takes at most as
many rows as there are idle slots (one autocommitted statement) -> slots deliver through
the sinks -> the OutcomeWriter records each outcome with one fenced, batched UPDATE.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Mapping, Sequence

import anyio
import anyio.abc
import asyncpg
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from worker.backoff import jittered, retry_delay
from worker.delivery import RetryPolicy, deliver
from worker.intent import Intent
from worker.listener import Listener
from worker.logs import one_line
from worker.outcomes import DB_UNAVAILABLE, Dead, Outcome, OutcomeWriter, Released, Retry
from worker.settings import Settings
from worker.sinks.base import Sink
from worker.stats import Stats
from worker.wakeup import Wakeup

log = logging.getLogger("outbox.relay")

# After the shutdown's delivery phase, how long we keep trying to record outcomes and
# release rows. Past it, unrecorded rows are rescued by lease expiry (redelivered).
_FLUSH_TIMEOUT = 10.0


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Relay:
    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        dsn: str,
        queries: Mapping[str, str],
        settings: Settings,
        sinks: Mapping[str, Sink],
        stats: Stats | None = None,
        worker_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.worker_id = worker_id or new_worker_id()
        self.stats = stats or Stats(settings.concurrency)
        self.wakeup = Wakeup()
        # Rows this worker holds a lease on, from claim until their outcome is recorded.
        self.in_flight: dict[int, Intent] = {}
        # The subset whose outcome is handed to the writer but not yet recorded: the
        # heartbeat leaves them alone (their write may land before its UPDATE).
        self._submitted: set[int] = set()
        self._pool = pool
        self._q = queries
        self._sinks = sinks
        self._limited = {k: s.saturated for k, s in sinks.items() if hasattr(s, "saturated")}
        self._policy = RetryPolicy(
            settings.max_attempts, settings.backoff_base, settings.backoff_max
        )
        self._idle_slots = 0
        self._slot_freed = Wakeup()
        self._stopping = False
        self._hard_stopped = False
        self._idle_flag_pid: int | None = None
        self._delivery_scope: anyio.CancelScope | None = None
        self._writer = OutcomeWriter(
            pool, queries["record_outcomes"], self.worker_id, self._on_written
        )
        self.listener = (
            Listener(
                dsn,
                settings.channel,
                self.wakeup,
                self.stats,
                ping_interval=settings.ping_interval,
                ping_timeout=settings.ping_timeout,
                application_name=f"outbox-worker listener {self.worker_id}",
            )
            if settings.listen
            else None
        )

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stopping

    def stop(self) -> None:
        """Phase one: stop claiming; in-flight deliveries get ``grace`` seconds to finish."""
        if not self._stopping:
            log.info(
                "stopping: no new claims; waiting up to %gs for %d in-flight deliveries",
                self.settings.grace,
                len(self.in_flight),
            )
            # The grace period runs from now, whatever the claim loop is doing: it may be
            # waiting to hand a row it already claimed to a slot that is itself busy.
            if self._delivery_scope is not None:
                self._delivery_scope.deadline = anyio.current_time() + self.settings.grace
        self._stopping = True
        self.wakeup.set()
        self._slot_freed.set()

    def hard_stop(self) -> None:
        """Phase two now: cancel in-flight deliveries and release their rows."""
        self.stop()
        self._hard_stopped = True
        if self._delivery_scope is not None:
            self._delivery_scope.cancel()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        send, receive = anyio.create_memory_object_stream[Intent](0)
        log.info(
            "worker %s: %d delivery slots, schema %s, %s",
            self.worker_id,
            self.settings.concurrency,
            self.settings.schema,
            "LISTEN + poll" if self.listener else "poll only",
        )
        async with anyio.create_task_group() as services:
            if self.listener is not None:
                services.start_soon(self.listener.run)
            if self.settings.heartbeat:
                services.start_soon(self._heartbeat_loop)
            with anyio.move_on_after(float("inf")) as flush_scope:
                async with anyio.create_task_group() as writer_group:
                    writer_group.start_soon(self._writer.run)
                    with anyio.CancelScope() as self._delivery_scope:
                        async with anyio.create_task_group() as slots:
                            async with receive:
                                for index in range(self.settings.concurrency):
                                    slots.start_soon(self._slot, index, receive.clone())
                            task_status.started()
                            async with send:  # closing it lets idle slots exit
                                await self._claim_loop(send)
                            # Busy slots finish their intent, or are cancelled at the deadline.
                            self._delivery_scope.deadline = min(
                                self._delivery_scope.deadline,
                                anyio.current_time() + self.settings.grace,
                            )
                    if self._delivery_scope.cancelled_caught:
                        log.warning(
                            "%s: cancelled %d deliveries",
                            "second stop request" if self._hard_stopped else "grace period over",
                            len(self.in_flight),
                        )
                    self._writer.close()
                    flush_scope.deadline = anyio.current_time() + _FLUSH_TIMEOUT
            await self._release_unfinished()
            services.cancel_scope.cancel()
        log.info("stopped")

    # --- claiming --------------------------------------------------------------------------

    async def _claim_loop(self, send: MemoryObjectSendStream[Intent]) -> None:
        """Claim while there is work; when drained, linger, then declare idle and sleep.

        Lingering (claiming again after ``linger`` seconds) keeps a worker fed by a steady
        stream busy without a notification per intent; only when a linger finds nothing
        does it ask producers to notify it (see triggers/010_notify_on_commit.sql).
        """
        failures = 0
        next_sweep = 0.0
        while not self._stopping:
            if self._idle_slots == 0:
                await self._slot_freed.wait(float("inf"))
                continue
            try:
                if anyio.current_time() >= next_sweep:
                    await self._sweep()
                    next_sweep = anyio.current_time() + max(
                        self.settings.poll_interval, self.settings.lease / 4
                    )
                got, full = await self._claim_and_dispatch(send)
                if full:
                    continue
                # Linger only after activity: a poll that found nothing goes back to sleep
                # (one claim per poll interval when idle).
                if self.settings.linger > 0 and (got or not self.idle_declared):
                    await self.wakeup.wait(self.settings.linger)
                    got, _ = await self._claim_and_dispatch(send)
                    if got or self._stopping:
                        await self._declare_busy()
                        continue
                # Once idle is declared, producers that decided not to notify have committed:
                # look once more, or their intents would wait for the poll.
                if not self.idle_declared and await self._declare_idle():
                    got, _ = await self._claim_and_dispatch(send)
                    if got:
                        continue
                await self._wait_for_work()
                failures = 0
            except DB_UNAVAILABLE as exc:
                failures += 1
                delay = retry_delay(failures, base=0.5, cap=30.0)
                log.warning(
                    "cannot claim: database unavailable (%s); retrying in %.1fs",
                    one_line(exc),
                    delay,
                )
                await self.wakeup.wait(delay)
        with anyio.CancelScope(shield=True), anyio.move_on_after(2):
            await self._declare_busy()

    async def _claim_and_dispatch(self, send: MemoryObjectSendStream[Intent]) -> tuple[int, bool]:
        """Claim for the idle slots and hand the rows over. Returns how many were claimed
        and whether the claim came back full (more may be waiting: claim again at once)."""
        want = min(self._idle_slots, self.settings.batch_size)
        if want == 0:
            return 0, True
        intents = await self._claim(want)
        for intent in intents:
            await send.send(intent)
            # Counted here, not by the slot: it runs later, and the next claim must not
            # count it idle in the meantime.
            self._idle_slots -= 1
        return len(intents), len(intents) == want

    @property
    def idle_declared(self) -> bool:
        """Producers notify on our account (our flag row matches the live LISTEN backend)."""
        pid = self.listener.backend_pid if self.listener else None
        return pid is not None and self._idle_flag_pid == pid

    async def _declare_idle(self) -> bool:
        pid = self.listener.backend_pid if self.listener else None
        if pid is None:  # nobody would hear a notification: rely on the poll
            return False
        await self._pool.execute(self._q["declare_idle"], pid, self.worker_id)
        self._idle_flag_pid = pid
        self.stats.on_idle(True)
        return True

    async def _declare_busy(self) -> None:
        if self._idle_flag_pid is None:
            return
        await self._pool.execute(self._q["declare_busy"], self._idle_flag_pid)
        self._idle_flag_pid = None
        self.stats.on_idle(False)

    async def _sweep(self) -> None:
        """Periodic housekeeping: expired leases back to pending, stale idle flags away."""
        await self._rescue_expired()
        await self._pool.execute(self._q["sweep_idle_workers"])

    async def _claim(self, limit: int) -> list[Intent]:
        # Shielded: a claim cancelled after the server committed it would strand its rows
        # until their lease expired.
        with anyio.CancelScope(shield=True):
            rows = await self._pool.fetch(
                self._q["claim"],
                self.worker_id,
                self.settings.lease,
                limit,
                self._saturated_kinds(),
            )
        intents = [
            Intent(
                id=r["id"],
                kind=r["kind"],
                payload=r["payload"],
                attempts=r["attempts"],
                max_attempts=r["max_attempts"] or self.settings.max_attempts,
                created_at=r["created_at"],
                run_at=r["run_at"],
            )
            for r in rows
        ]
        for intent in intents:
            self.in_flight[intent.id] = intent
        if intents:
            self.stats.on_claim(len(intents))
        return intents

    def _saturated_kinds(self) -> list[str]:
        """Kinds whose sink is at its --limits: claiming them now would only defer them."""
        return [kind for kind, saturated in self._limited.items() if saturated()]

    async def _wait_for_work(self) -> None:
        timeout = jittered(self.settings.poll_interval)
        try:
            due_in = await self._pool.fetchval(self._q["next_due"])
        except DB_UNAVAILABLE:
            due_in = None
        if due_in is not None:
            # Something is scheduled (a retry, a run_at in the future): wake when it falls
            # due. Rows that are due already but were skipped are being claimed by another
            # worker right now; look again shortly rather than spin.
            timeout = min(timeout, max(due_in, 0.05))
        if not await self.wakeup.wait(timeout):
            self.stats.on_poll()

    async def _rescue_expired(self) -> None:
        rows = await self._pool.fetch(
            self._q["rescue_expired"], self.settings.max_attempts, list(self.in_flight)
        )
        if rows:
            dead = sum(1 for r in rows if r["status"] == "dead")
            log.warning(
                "rescued %d intents whose lease expired (%d of them now dead)", len(rows), dead
            )

    # --- delivering ------------------------------------------------------------------------

    async def _slot(self, index: int, receive: MemoryObjectReceiveStream[Intent]) -> None:
        async with receive:
            while True:
                self._idle_slots += 1  # the claim loop takes it off when it hands one over
                self._slot_freed.set()
                try:
                    intent = await receive.receive()
                except anyio.EndOfStream:
                    return
                self.stats.on_delivery_start(index, intent)
                try:
                    outcome = await deliver(
                        intent, self._sinks, self._policy, self.settings.delivery_timeout
                    )
                finally:
                    self.stats.on_delivery_end(index)
                self._submitted.add(intent.id)
                self._writer.submit(intent, outcome)

    def _on_written(self, batch: Sequence[tuple[Intent, Outcome]], written: set[int]) -> None:
        wake = False
        for intent, outcome in batch:
            self.in_flight.pop(intent.id, None)
            self._submitted.discard(intent.id)
            if intent.id in written:
                self.stats.on_recorded(intent, outcome)
                if isinstance(outcome, Retry):
                    log.info(
                        "intent %d (%s) attempt %d failed, retry in %.1fs: %s",
                        intent.id,
                        intent.kind,
                        intent.attempts,
                        outcome.delay,
                        outcome.error,
                    )
                    wake |= outcome.delay < self.settings.poll_interval
                elif isinstance(outcome, Dead):
                    log.warning("intent %d (%s) dead: %s", intent.id, intent.kind, outcome.error)
            else:
                self.stats.on_lease_lost(1)
        if wake:  # the claim loop re-reads next_due and sleeps until the retry is due
            self.wakeup.set()

    # --- leases ----------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            await anyio.sleep(self.settings.lease / 3)
            ids = [i for i in self.in_flight if i not in self._submitted]
            if not ids:
                continue
            try:
                rows = await self._pool.fetch(
                    self._q["heartbeat"], self.worker_id, ids, self.settings.lease
                )
            except DB_UNAVAILABLE as exc:
                log.warning(
                    "heartbeat failed (%s); leases expire in <= %gs",
                    one_line(exc),
                    self.settings.lease,
                )
                continue
            # Still delivering and no longer ours: another worker has taken the row over.
            lost = [
                r["id"]
                for r in rows
                if not r["renewed"] and r["id"] in self.in_flight and r["id"] not in self._submitted
            ]
            if lost:  # counted in the stats when their fenced outcome write is refused
                log.warning(
                    "lost the lease of intents %s; their outcomes will be discarded", lost[:10]
                )

    async def _release_unfinished(self) -> None:
        """Rows claimed but never delivered (cancelled, or never handed to a slot)."""
        if not self.in_flight:
            return
        batch: list[tuple[Intent, Outcome]] = [(i, Released()) for i in self.in_flight.values()]
        with anyio.CancelScope(shield=True), anyio.move_on_after(_FLUSH_TIMEOUT) as scope:
            await self._writer.write(batch)
        if scope.cancelled_caught:
            log.error(
                "could not release %d intents; they return when their lease expires", len(batch)
            )
        else:
            log.info("released %d unfinished intents back to pending", len(batch))
