"""Python producer helper: enqueue an intent inside the caller's transaction."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import asyncpg
import orjson

from worker.settings import default_channel, validate_schema_name
from worker.store.queries import Store
from worker.store.sqlfiles import Names


@lru_cache(maxsize=16)
def _store(schema: str) -> Store:
    validate_schema_name(schema)
    return Store(Names(schema, default_channel(schema)))


async def enqueue(
    conn: asyncpg.Connection,
    kind: str,
    payload: Any,
    *,
    run_at: datetime | None = None,
    dedupe_key: str | None = None,
    max_attempts: int | None = None,
    ordering_key: str | None = None,
    trace_context: Mapping[str, str] | None = None,
    schema: str = "outbox",
) -> int:
    """Insert an intent and return its id (the first one's, for a repeated ``dedupe_key``).

    Call it inside the transaction that writes your business rows: both commit or neither.
    Intents that share an ``ordering_key`` are delivered one at a time, in id order.
    ``trace_context`` (``{"traceparent": ..., "tracestate": ...}``) defaults to the current
    OpenTelemetry span's, if there is one; ``{}`` enqueues none.
    """
    if trace_context is None and "opentelemetry.trace" in sys.modules:
        # Only a process that loaded OpenTelemetry can have a span: others pay nothing here.
        from worker.observe.otel import current_trace_context

        trace_context = current_trace_context()
    return await _store(schema).enqueue(
        conn,
        kind=kind,
        payload_json=orjson.dumps(payload).decode(),
        run_at=run_at,
        dedupe_key=dedupe_key,
        max_attempts=max_attempts,
        ordering_key=ordering_key,
        trace_context_json=orjson.dumps(dict(trace_context)).decode() if trace_context else None,
    )
