"""Checks shared by the broker sink tests (NATS, RabbitMQ)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import anyio

from worker.errors import PermanentError, TransientError
from worker.intent import Intent
from worker.sinks.base import BatchSink


async def assert_waiters_share_a_failed_connect(
    sink: Any, intent: Callable[[int], Intent], deliveries: int = 6
) -> None:
    """``deliveries`` at once to ``sink``, whose broker cannot be reached: the sink tries to
    connect once and every delivery fails with that "cannot connect" (its ``ConnectGate`` is
    wired in). Closes the sink."""
    connects = 0
    connect = sink._connect

    async def counting_connect() -> Any:
        nonlocal connects
        connects += 1
        return await connect()

    sink._connect = counting_connect
    failures: list[TransientError] = []

    async def deliver(n: int) -> None:
        try:
            await sink.deliver(intent(n))
        except TransientError as exc:
            failures.append(exc)

    try:
        async with anyio.create_task_group() as tg:
            for n in range(deliveries):
                tg.start_soon(deliver, n)
    finally:
        await sink.aclose()
    assert len(failures) == deliveries and connects == 1
    assert all("cannot connect" in str(f) for f in failures)


Outcome = tuple[type[BaseException], str] | None  # None: delivered; else (error type, text in it)


def assert_outcomes(results: Sequence[BaseException | None], expected: Sequence[Outcome]) -> None:
    """``deliver_many``'s results are, entry by entry, the ``expected`` outcomes."""
    assert len(results) == len(expected)
    for n, (result, want) in enumerate(zip(results, expected, strict=True)):
        if want is None:
            assert result is None, f"entry {n}: {result!r}"
        else:
            kind, text = want
            assert isinstance(result, kind) and text in str(result), f"entry {n}: {result!r}"


async def assert_unreachable_batch_fails_each_intent(
    sink: Any, good: Callable[[int], Intent], bad: Intent
) -> None:
    """A batch to ``sink``, whose broker cannot be reached: one connect attempt, every valid
    intent gets its "cannot connect", the invalid one its own permanent error. Closes the sink."""
    assert isinstance(sink, BatchSink) and sink.max_batch >= 3
    connects = 0
    connect = sink._connect  # type: ignore[attr-defined]

    async def counting_connect() -> Any:
        nonlocal connects
        connects += 1
        return await connect()

    sink._connect = counting_connect  # type: ignore[attr-defined]
    try:
        results = await sink.deliver_many([good(1), bad, good(2)])
    finally:
        await sink.aclose()
    assert connects == 1
    assert_outcomes(
        results,
        [
            (TransientError, "cannot connect"),
            (PermanentError, ""),
            (TransientError, "cannot connect"),
        ],
    )
    assert results[0] is not results[2]  # one exception object per intent
