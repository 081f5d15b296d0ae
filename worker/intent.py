"""The unit of work: one committed row of the intent table, as a delivery sees it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class Intent:
    """One intent as a handler or a sink receives it: the row's columns that a delivery
    needs, the payload already decoded."""

    id: int
    """The row's id: the same on every attempt, so a receiver can recognise a repeat."""
    kind: str
    """Who delivers it: a built-in kind or the name a handler was registered under."""
    payload: Any
    """The decoded JSON payload. Its shape is the kind's business: check it, and raise
    ``PermanentError`` for one that can never be delivered."""
    attempts: int
    """Deliveries started so far, this one included (1 on the first)."""
    max_attempts: int
    """After this many failed attempts the intent is ``dead``."""
    created_at: datetime
    """When its transaction wrote it."""
    run_at: datetime
    """Not before this time: the producer's, or the retry's."""
    ordering_key: str | None = None
    """Intents of one key are delivered one at a time, in id order; ``None``: unordered."""
    trace_context: Mapping[str, str] | None = None
    """W3C trace context, ``{"traceparent": ..., "tracestate": ...}``: the producer's as
    enqueued or, while the worker traces, its delivery span's (a child of the producer's).
    What a sink puts on the message it sends (worker.observe.tracing.with_trace_context)."""

    @classmethod
    def from_row(cls, row: Mapping[str, Any], default_max_attempts: int) -> Intent:
        """A claimed row (the claim's RETURNING list), by column name."""
        return cls(
            row["id"],
            row["kind"],
            row["payload"],
            row["attempts"],
            row["max_attempts"] or default_max_attempts,
            row["created_at"],
            row["run_at"],
            row["ordering_key"],
            row["trace_context"],
        )
