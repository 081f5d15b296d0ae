"""Run one intent through its sink and turn what happened into an Outcome."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import anyio

from worker.backoff import retry_delay
from worker.errors import Deferred, PermanentError, TransientError
from worker.intent import Intent
from worker.outcomes import Dead, Outcome, Released, Retry, Sent
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
        return Sent()
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


async def deliver(
    intent: Intent, sinks: Mapping[str, Sink], policy: RetryPolicy, timeout: float
) -> Outcome:
    sink = sinks.get(intent.kind)
    if sink is None:
        known = ", ".join(sorted(sinks)) or "none"
        return Dead(f"unknown kind {intent.kind!r}: no sink or handler for it (known: {known})")
    try:
        with anyio.move_on_after(timeout) as deadline:
            await sink.deliver(intent)
    except Exception as exc:  # a sink's failure is data, never a worker crash
        return classify(intent, exc, policy)
    if deadline.cancelled_caught:  # ours, not a TimeoutError the sink raised itself
        return classify(intent, TransientError(f"delivery timed out after {timeout:g}s"), policy)
    return Sent()
