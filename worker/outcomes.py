"""What happened to one delivery, and the batched, fenced write that records it."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import anyio
import asyncpg

from worker.backoff import retry_delay
from worker.intent import Intent
from worker.logs import one_line

log = logging.getLogger("outbox.outcomes")

_MAX_ERROR_CHARS = 2000
_MAX_BATCH = 1000

# Errors that mean "the database can't serve us right now" (down, restarting, failing
# over to a replica that is still read-only, out of connections, cancelled by an
# operator): retry with backoff, never crash the worker.
DB_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.TransactionRollbackError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
)


@dataclass(frozen=True, slots=True)
class Sent:
    pass


@dataclass(frozen=True, slots=True)
class Retry:
    delay: float
    error: str


@dataclass(frozen=True, slots=True)
class Dead:
    error: str


@dataclass(frozen=True, slots=True)
class Released:
    """Handed back without an outcome (shutdown, or its kind at its limit), due again in
    ``delay`` seconds; the attempt is refunded."""

    delay: float = 0.0


Outcome = Sent | Retry | Dead | Released


def _row(intent: Intent, outcome: Outcome) -> tuple[int, str, float, str | None, int]:
    match outcome:
        case Sent():
            return intent.id, "sent", 0.0, None, 0
        case Retry(delay, error):
            return intent.id, "pending", delay, error[:_MAX_ERROR_CHARS], 0
        case Dead(error):
            return intent.id, "dead", 0.0, error[:_MAX_ERROR_CHARS], 0
        case Released(delay):
            return intent.id, "pending", delay, None, 1


class OutcomeWriter:
    """Writes outcomes in batches: whatever accumulated while the previous write ran goes
    into the next statement, so throughput does not hinge on one commit per intent."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        query: str,
        worker_id: str,
        on_written: Callable[[Sequence[tuple[Intent, Outcome]], set[int]], None],
    ) -> None:
        self._pool = pool
        self._query = query
        self._worker_id = worker_id
        self._on_written = on_written
        self._send, self._receive = anyio.create_memory_object_stream[tuple[Intent, Outcome]](
            math.inf
        )

    def submit(self, intent: Intent, outcome: Outcome) -> None:
        self._send.send_nowait((intent, outcome))

    def close(self) -> None:
        """No more outcomes: ``run`` returns once everything submitted is written."""
        self._send.close()

    async def run(self) -> None:
        async with self._receive:
            async for first in self._receive:
                batch = [first]
                while len(batch) < _MAX_BATCH:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                await self.write(batch)

    async def write(self, batch: list[tuple[Intent, Outcome]]) -> None:
        columns = list(zip(*(_row(i, o) for i, o in batch), strict=True))
        attempt = 0
        while True:
            try:
                rows = await self._pool.fetch(self._query, self._worker_id, *columns)
                break
            except DB_UNAVAILABLE as exc:
                # Keep the outcomes and try again: losing them would mean redelivery.
                attempt += 1
                delay = retry_delay(attempt, base=0.2, cap=10.0)
                log.warning(
                    "could not record %d outcomes (%s); retrying in %.1fs",
                    len(batch),
                    one_line(exc),  # str() of a TimeoutError is empty
                    delay,
                )
                await anyio.sleep(delay)
        written = {r["id"] for r in rows}
        for intent, outcome in batch:
            if intent.id not in written:
                log.warning(
                    "intent %d: lease lost before its outcome (%s) was recorded; "
                    "another worker owns it now, outcome discarded",
                    intent.id,
                    type(outcome).__name__,
                )
        self._on_written(batch, written)
