"""The one owner of a claimed row's life in this worker, and the backpressure that bounds it.

    claimed ──▶ delivering ──▶ outcome waiting ──▶ recorded
    (claimer)   (dispatcher)   (outcome writer)    (out of ``held``)

``InFlight`` alone adds rows to ``held`` and takes them out; the claimer, the dispatcher and
the writer only tell it what happened. Every held row is ours until its fenced outcome write
lands, so the heartbeat (leases.py) renews all of them, those whose outcome waits in the
writer's queue included: a writer held up by a lock or a half-open connection must not let
their leases lapse, or another worker rescues and delivers them again.

Backpressure: at most ``bound`` rows are held. The claim loop claims only into that room and
waits while there is none; the writer's queue, the only part that could grow, is bounded
with it, whatever the writer does. A wait longer than ``STALL_NOTICE`` is a stall: one log
line when it starts, one when claims resume, and the stats (dashboard, /metrics) show it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import anyio

from worker.intent import Intent
from worker.observe.stats import Stats
from worker.outcome import Dead, Outcome, Released, Retry, Sent
from worker.relay.wakeup import Wakeup
from worker.relay.writer import OutcomeWriter
from worker.settings import Settings
from worker.store.queries import Conn, Store

log = logging.getLogger("outbox.inflight")

# A healthy outcome write takes milliseconds; waiting this long for one is a stall worth a
# line. Shorter waits are ordinary flow control (a fast sink outrunning the writer): silent.
STALL_NOTICE = 1.0


def held_bound(concurrency: int) -> int:
    """Rows one worker may hold: every slot delivering, and as many outcomes again waiting
    for the writer. The writer writes what accumulated during its previous statement, so
    while it keeps up, fewer than ``concurrency`` outcomes wait; the second half is slack for
    a slow commit, and the bound still keeps a stalled writer's backlog (and the rows whose
    leases the heartbeat renews) of the order of the concurrency."""
    return 2 * concurrency


class InFlight:
    def __init__(
        self,
        conn: Conn,
        store: Store,
        worker_id: str,
        *,
        settings: Settings,
        stats: Stats,
        wakeup: Wakeup,
    ) -> None:
        self._held: dict[int, Intent] = {}
        self.bound = held_bound(settings.concurrency)
        self._waiting: set[int] = set()  # held rows whose outcome is in the writer's hands
        self._settings = settings
        self._stats = stats
        self._wakeup = wakeup
        self._room: anyio.Event | None = None  # set when the claim loop may claim again
        self._full_since: float | None = None  # the claim loop first found no room
        self._stalled = False  # and that has lasted past STALL_NOTICE (said so)
        self._writer = OutcomeWriter(
            conn,
            store,
            worker_id,
            self._recorded,
            skip_dead=settings.ordering_on_dead == "continue",
            on_db_error=stats.on_db_error,
        )

    # --- the transitions ---------------------------------------------------------------------

    @property
    def held(self) -> Mapping[int, Intent]:
        """Rows this worker holds a lease on, from claim until their outcome is recorded."""
        return self._held

    @property
    def room(self) -> int:
        """How many more rows the claim loop may claim now."""
        return self.bound - len(self._held)

    def claimed(self, intents: Iterable[Intent]) -> None:
        held = self._held
        for intent in intents:
            held[intent.id] = intent

    def delivered(self, intent: Intent, outcome: Outcome) -> None:
        """The dispatcher's outcome: to the writer; the row stays held (and heartbeated)."""
        self._waiting.add(intent.id)
        self._stats.outcomes_unrecorded = len(self._waiting)
        self._writer.submit(intent, outcome)

    def delivering(self, intent_id: int) -> bool:
        """Held, and its outcome not yet handed to the writer."""
        return intent_id in self.held and intent_id not in self._waiting

    def _recorded(self, batch: Sequence[tuple[Intent, Outcome]], written: set[int]) -> None:
        """The writer's answer: these rows are ours no more (written, or fenced off)."""
        held, waiting = self._held, self._waiting
        for intent, _ in batch:
            held.pop(intent.id, None)
            waiting.discard(intent.id)
        self._stats.outcomes_unrecorded = len(waiting)
        if self._full_since is not None and self.room > 0:
            self._made_room()
        if len(written) < len(batch):
            self._stats.on_lease_lost(len(batch) - len(written))
            batch = [(i, o) for i, o in batch if i.id in written]
        self._stats.on_recorded_many(batch)
        wake = False
        for intent, outcome in batch:
            # The key's next intent may be claimable now: ours to claim, not the poll's.
            wake |= intent.ordering_key is not None and isinstance(outcome, Sent | Dead)
            if isinstance(outcome, Retry):
                log.info(
                    "intent %d (%s) attempt %d failed, retry in %.1fs: %s",
                    intent.id,
                    intent.kind,
                    intent.attempts,
                    outcome.delay,
                    outcome.error,
                )
                wake |= outcome.delay < self._settings.poll_interval
            elif isinstance(outcome, Dead):
                log.warning("intent %d (%s) dead: %s", intent.id, intent.kind, outcome.error)
            elif isinstance(outcome, Sent):  # a line each is too many at volume; -v shows it
                log.debug("intent %d (%s) sent", intent.id, intent.kind)
        if wake:  # the claim loop claims again, or re-reads next_due (a retry soon)
            self._wakeup.set()

    # --- the writer's life -------------------------------------------------------------------

    async def run(self) -> None:
        """Record outcomes until ``close``d and flushed."""
        await self._writer.run()

    def close(self) -> None:
        """No more outcomes: ``run`` returns once everything submitted is recorded."""
        self._writer.close()

    async def release_unfinished(self, timeout: float) -> None:
        """At the end: rows still held (delivery cancelled, never handed to a slot, or an
        outcome the flush could not write) back to pending, attempt refunded."""
        if not self.held:
            return
        batch: list[tuple[Intent, Outcome]] = [(i, Released()) for i in self.held.values()]
        with anyio.CancelScope(shield=True), anyio.move_on_after(timeout) as scope:
            await self._writer.write(batch)
        if scope.cancelled_caught:
            log.error(
                "could not release %d intents; they return when their lease expires", len(batch)
            )
        else:
            log.info("released %d unfinished intents back to pending", len(batch))

    # --- backpressure ------------------------------------------------------------------------

    def interrupt(self) -> None:
        """Wake ``wait_for_room`` now (the relay is stopping)."""
        if self._room is not None:
            self._room.set()

    async def wait_for_room(self, timeout: float) -> None:
        """Until the writer has recorded enough for the claim loop to claim again, for at
        most ``timeout`` seconds (its housekeeping goes on during a stall), or ``interrupt``.
        No room for over ``STALL_NOTICE`` seconds is a stall: said once when it starts."""
        if self.room > 0:
            return
        now = anyio.current_time()
        if self._full_since is None:
            self._full_since = now
        if not self._stalled:  # wake in time to announce it
            timeout = min(timeout, self._full_since + STALL_NOTICE - now)
        self._room = room = anyio.Event()
        try:
            with anyio.move_on_after(max(timeout, 0.0)):
                await room.wait()
        finally:
            self._room = None
        full_since = self._full_since  # None: the writer made room meanwhile
        if full_since is None or self._stalled:
            return
        waited = anyio.current_time() - full_since
        if waited >= STALL_NOTICE:
            self._stalled = True
            self._stats.on_claims_paused(waited)
            stuck = self._writer.busy_for()
            log.warning(
                "claims paused: %d outcomes wait to be recorded (%d rows held, at most %d)%s; "
                "the heartbeat keeps renewing their leases; claims resume once they are recorded",
                len(self._waiting),
                len(self.held),
                self.bound,
                "" if stuck is None else f"; the outcome write has been stuck for {stuck:.1f}s",
            )

    def _made_room(self) -> None:
        """The writer recorded rows (the room grew): wake the claim loop, end a stall."""
        if self._room is not None:
            self._room.set()
        if self._stalled and self._full_since is not None:
            log.info(
                "claims resumed after %.1fs: outcomes are recorded again "
                "(%d still waiting, %d rows held)",
                anyio.current_time() - self._full_since,
                len(self._waiting),
                len(self.held),
            )
            self._stats.on_claims_paused(None)
        self._stalled = False
        self._full_since = None
