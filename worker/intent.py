"""The unit of work: one committed row of the intent table, as a delivery sees it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class Intent:
    id: int
    kind: str
    payload: Any  # decoded JSON; sinks validate its shape
    attempts: int  # including the current one
    max_attempts: int
    created_at: datetime
    run_at: datetime
    ordering_key: str | None = None  # intents of one key are delivered one at a time, in order
    # W3C trace context, {"traceparent": ..., "tracestate": ...}: what a sink puts on the
    # message it sends (worker.observe.tracing.with_trace_context). The producer's as enqueued, or,
    # while the worker traces, that of its delivery span (a child of the producer's).
    trace_context: Mapping[str, str] | None = None

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
