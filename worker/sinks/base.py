"""The one boundary between the relay and the outside world."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

from worker.errors import PermanentError, TransientError
from worker.intent import Intent


class Sink(Protocol):
    """Delivers intents of one kind.

    ``deliver`` returns normally on success and raises ``TransientError`` or
    ``PermanentError`` (from ``worker.errors``) otherwise; any other exception is treated
    as transient. It may be called from many tasks at once (one per delivery slot).

    A sink that sends a message puts the intent's W3C trace context on it:
    ``worker.observe.tracing.with_trace_context(headers, intent)`` adds ``traceparent`` (and
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


def error_text(exc: BaseException, secrets: Iterable[str | None] = ()) -> str:
    """``Type: message`` on one line, every secret replaced by ``***`` (before the cut, so no
    part of one survives it), at most 300 characters: a sink's words for a failure, which
    end up in ``last_error`` and the log. ``secrets`` are the sink's own credentials, looked
    for only in its client library's error text, which may quote them without a URL around
    them (a NATS token); a URL's password is masked where it stands in any case."""
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text[:300]


def copy_error(exc: BaseException) -> BaseException:
    """The same delivery error for another intent (one exception object per result)."""
    if isinstance(exc, TransientError):
        return TransientError(str(exc), retry_after=exc.retry_after)
    if isinstance(exc, PermanentError):
        return PermanentError(str(exc))
    return exc


class DeliversBatchOfOne:
    """``deliver`` for a sink whose work is in ``deliver_many``: a batch of one."""

    async def deliver_many(self, intents: Sequence[Intent]) -> Sequence[BaseException | None]:
        raise NotImplementedError

    async def deliver(self, intent: Intent) -> None:
        [error] = await self.deliver_many([intent])
        if error is not None:
            raise error
