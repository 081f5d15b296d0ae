"""Python producer helper: enqueue an intent inside the caller's transaction."""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache
from typing import Any

import asyncpg
import orjson

from worker.settings import default_channel, validate_schema_name
from worker.sqlfiles import Names, load_queries


@lru_cache(maxsize=16)
def _enqueue_sql(schema: str) -> str:
    validate_schema_name(schema)
    return load_queries(Names(schema, default_channel(schema)))["enqueue"]


async def enqueue(
    conn: asyncpg.Connection,
    kind: str,
    payload: Any,
    *,
    run_at: datetime | None = None,
    dedupe_key: str | None = None,
    max_attempts: int | None = None,
    ordering_key: str | None = None,
    schema: str = "outbox",
) -> int:
    """Insert an intent and return its id (the first one's, for a repeated ``dedupe_key``).

    Call it inside the transaction that writes your business rows: both commit or neither.
    Intents that share an ``ordering_key`` are delivered one at a time, in id order.
    """
    payload_text = orjson.dumps(payload).decode()
    intent_id = await conn.fetchval(
        _enqueue_sql(schema), kind, payload_text, run_at, dedupe_key, max_attempts, ordering_key
    )
    return int(intent_id)
