"""The unit of work: one committed row of the intent table, as a delivery sees it."""

from __future__ import annotations

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
