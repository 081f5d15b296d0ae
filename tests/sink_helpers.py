"""Checks shared by the broker sink tests (NATS, RabbitMQ)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio

from worker.errors import TransientError
from worker.intent import Intent


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
