"""The one boundary between the relay and the outside world."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from worker.intent import Intent


class Sink(Protocol):
    """Delivers intents of one kind.

    ``deliver`` returns normally on success and raises ``TransientError`` or
    ``PermanentError`` (from ``worker.errors``) otherwise; any other exception is treated
    as transient. It may be called from many tasks at once (one per delivery slot).

    A sink that sends a message puts the intent's W3C trace context on it:
    ``worker.tracing.with_trace_context(headers, intent)`` adds ``traceparent`` (and
    ``tracestate``) to the message's headers, or to the fields a job queue reads them from.
    """

    async def deliver(self, intent: Intent) -> None: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class BatchSink(Sink, Protocol):
    """A sink that can pipeline: publish many intents, then gather their acknowledgements.

    ``deliver_many`` gets up to ``max_batch`` intents of its kind (each one counts as a
    delivery in flight) and returns one entry per intent, in order: ``None`` if that intent
    was delivered, else the exception that ``deliver`` would have raised for it. Raising
    instead fails every intent of the batch with that exception. Like ``deliver``, it may
    run in several tasks at once; the relay's delivery timeout covers the whole call.
    """

    max_batch: int

    async def deliver_many(self, intents: Sequence[Intent]) -> Sequence[BaseException | None]: ...
