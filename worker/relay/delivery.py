"""Turn what happened to one delivery into an Outcome (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from worker.backoff import retry_delay
from worker.errors import Deferred, PermanentError, TransientError
from worker.intent import Intent
from worker.outcome import SENT, Dead, Outcome, Released, Retry
from worker.sinks.base import Sink


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int  # used when the row has no max_attempts of its own
    backoff_base: float
    backoff_max: float


def describe(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, TransientError | PermanentError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def classify(intent: Intent, exc: BaseException | None, policy: RetryPolicy) -> Outcome:
    """Pure: success, retry later, or dead. Unknown exceptions count as transient."""
    if exc is None:
        return SENT
    if isinstance(exc, Deferred):
        return Released(exc.retry_after)
    reason = describe(exc)
    if isinstance(exc, PermanentError):
        return Dead(reason)
    if intent.attempts >= intent.max_attempts:
        return Dead(f"attempts exhausted ({intent.attempts}/{intent.max_attempts}); last: {reason}")
    retry_after = exc.retry_after if isinstance(exc, TransientError) else None
    delay = (
        retry_after
        if retry_after is not None
        else retry_delay(intent.attempts, base=policy.backoff_base, cap=policy.backoff_max)
    )
    return Retry(delay, reason)


def unknown_kind(intent: Intent, sinks: Mapping[str, Sink]) -> Dead:
    known = ", ".join(sorted(sinks)) or "none"
    return Dead(f"unknown kind {intent.kind!r}: no sink or handler for it (known: {known})")
