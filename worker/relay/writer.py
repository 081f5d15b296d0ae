"""The batched, fenced write that records what happened to deliveries (worker/outcome.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import anyio

from worker.intent import Intent
from worker.observe.outage import Outage
from worker.outcome import Outcome
from worker.store.db import DB_UNAVAILABLE

if TYPE_CHECKING:
    from worker.store.queries import Conn, Store

log = logging.getLogger("outbox.outcomes")

_MAX_BATCH = 1000


class OutcomeWriter:
    """Writes outcomes in batches: whatever accumulated while the previous write ran goes
    into the next statement, so throughput does not hinge on one commit per intent.

    ``submit`` is a list append (and, when the writer sleeps, one wake-up): deliveries pay
    nothing per outcome beyond that.
    """

    def __init__(
        self,
        conn: Conn,
        store: Store,
        worker_id: str,
        on_written: Callable[[Sequence[tuple[Intent, Outcome]], set[int]], None],
        *,
        skip_dead: bool = False,  # --ordering-on-dead continue
        on_db_error: Callable[[str], None] = lambda _operation: None,
    ) -> None:
        self._on_db_error = on_db_error
        self._conn = conn
        self._store = store
        self._worker_id = worker_id
        self._skip_dead = skip_dead
        self._on_written = on_written
        self._pending: list[tuple[Intent, Outcome]] = []
        self._wake: anyio.Event | None = None  # set while the writer sleeps
        self._closed = False
        self._busy_since: float | None = None  # a statement (or its retries) under way
        self._outage = Outage(log, "outcome writer", base=0.2)

    def submit(self, intent: Intent, outcome: Outcome) -> None:
        self._pending.append((intent, outcome))
        if self._wake is not None:
            self._wake.set()

    def busy_for(self) -> float | None:
        """How long the write under way has been running (None: not writing)."""
        since = self._busy_since
        return None if since is None else anyio.current_time() - since

    def close(self) -> None:
        """No more outcomes: ``run`` returns once everything submitted is written."""
        self._closed = True
        if self._wake is not None:
            self._wake.set()

    async def run(self) -> None:
        while True:
            if not self._pending:
                if self._closed:
                    return
                self._wake = anyio.Event()
                try:
                    await self._wake.wait()
                finally:
                    self._wake = None
                continue
            batch, self._pending = self._pending[:_MAX_BATCH], self._pending[_MAX_BATCH:]
            await self.write(batch)

    async def write(self, batch: Sequence[tuple[Intent, Outcome]]) -> None:
        self._busy_since = anyio.current_time()
        try:
            while True:
                try:
                    written = await self._store.record_outcomes(
                        self._conn, self._worker_id, batch, skip_dead=self._skip_dead
                    )
                    break
                except DB_UNAVAILABLE as exc:
                    self._on_db_error("record")
                    # Keep the outcomes and try again: losing them would mean redelivery.
                    delay = self._outage.failed(exc, f"; could not record {len(batch)} outcomes")
                    await anyio.sleep(delay)
        finally:
            self._busy_since = None
        self._outage.recovered()
        if len(written) < len(batch):
            for intent, outcome in batch:
                if intent.id not in written:
                    log.warning(
                        "intent %d: lease lost before its outcome (%s) was recorded; "
                        "another worker owns it now, outcome discarded",
                        intent.id,
                        type(outcome).__name__,
                    )
        self._on_written(batch, written)
