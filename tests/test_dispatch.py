"""The dispatcher (delivery slots) on its own, and a batching sink through the real relay."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import anyio
import pytest

from tests.conftest import count_by_status, wait_until
from worker import PermanentError, TransientError
from worker.intent import Intent
from worker.observe.stats import Stats
from worker.outcome import Dead, Outcome, Retry, Sent
from worker.relay.delivery import RetryPolicy
from worker.relay.dispatch import Dispatcher
from worker.sinks.handlers import HandlerSink
from worker.store.sqlfiles import Names

POLICY = RetryPolicy(max_attempts=5, backoff_base=1.0, backoff_max=10.0)
NOW = datetime.now(UTC)


def intent(n: int, kind: str = "k") -> Intent:
    return Intent(n, kind, {"n": n}, 1, 5, NOW, NOW)


class BatchRecorder:
    """A BatchSink: records each call's ids; fails the ids it is told to."""

    def __init__(self, max_batch: int, fail: dict[int, BaseException] | None = None) -> None:
        self.max_batch = max_batch
        self.calls: list[list[int]] = []
        self.fail = fail or {}
        self.raise_all: BaseException | None = None
        self.release = anyio.Event()
        self.release.set()

    async def deliver(self, intent: Intent) -> None:
        (result,) = await self.deliver_many([intent])
        if result is not None:
            raise result

    async def deliver_many(self, intents: Sequence[Intent]) -> list[BaseException | None]:
        self.calls.append([i.id for i in intents])
        await self.release.wait()
        if self.raise_all is not None:
            raise self.raise_all
        return [self.fail.get(i.id) for i in intents]

    async def aclose(self) -> None:
        pass


async def run_until(dispatcher: Dispatcher, outcomes: dict[int, Outcome], n: int) -> None:
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(dispatcher.run)
            await wait_until(lambda: len(outcomes) >= n, interval=0.005)
            dispatcher.close()


def make(concurrency: int, sinks: dict, timeout: float = 5.0) -> tuple[Dispatcher, dict]:
    outcomes: dict[int, Outcome] = {}
    dispatcher = Dispatcher(
        concurrency=concurrency,
        sinks=sinks,
        policy=POLICY,
        timeout=timeout,
        stats=Stats(concurrency),
        on_outcome=lambda i, o: outcomes.__setitem__(i.id, o),
    )
    return dispatcher, outcomes


async def test_concurrency_is_never_exceeded_and_slots_are_reused():
    in_flight = peak = 0

    async def slow(_intent: Intent) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await anyio.sleep(0.01)
        in_flight -= 1

    dispatcher, outcomes = make(3, {"k": HandlerSink(slow)})

    async def feed() -> None:
        for n in range(0, 30, 3):
            while dispatcher.free < 3:
                await dispatcher.wait_for_free()
            dispatcher.dispatch([intent(n), intent(n + 1), intent(n + 2)])

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(dispatcher.run)
            await feed()
            await wait_until(lambda: len(outcomes) == 30, interval=0.005)
            dispatcher.close()
    assert peak == 3
    assert all(isinstance(o, Sent) for o in outcomes.values())
    assert dispatcher.free == 3


async def test_unknown_kind_is_dead_without_taking_a_slot():
    dispatcher, outcomes = make(1, {"k": BatchRecorder(max_batch=1)})
    dispatcher.dispatch([intent(1, "nope")])
    assert dispatcher.free == 1
    assert isinstance(outcomes[1], Dead) and "unknown kind 'nope'" in outcomes[1].error


async def test_batch_sink_gets_chunks_and_per_intent_results():
    sink = BatchRecorder(
        max_batch=4, fail={2: PermanentError("no such subject"), 5: TransientError("nack")}
    )
    other: list[int] = []

    async def handler(i: Intent) -> None:
        other.append(i.id)

    dispatcher, outcomes = make(16, {"k": sink, "h": HandlerSink(handler)})
    dispatcher.dispatch([intent(n) for n in range(1, 10)] + [intent(100, "h")])
    assert dispatcher.free == 6  # each intent of a batch counts against the concurrency
    await run_until(dispatcher, outcomes, 10)
    assert sink.calls == [[1, 2, 3, 4], [5, 6, 7, 8], [9]]
    assert other == [100]
    assert isinstance(outcomes[2], Dead) and outcomes[2].error == "no such subject"
    assert isinstance(outcomes[5], Retry) and outcomes[5].error == "nack"
    assert all(isinstance(outcomes[n], Sent) for n in (1, 3, 4, 6, 7, 8, 9, 100))


@pytest.mark.parametrize("failure", ["raises", "wrong length"])
async def test_a_failing_batch_call_retries_every_intent_of_it(failure: str):
    sink = BatchRecorder(max_batch=10)
    if failure == "raises":
        sink.raise_all = ConnectionResetError("broker went away")
    else:
        sink.deliver_many = lambda intents: _two_results(intents)  # type: ignore[method-assign]
    dispatcher, outcomes = make(8, {"k": sink})
    dispatcher.dispatch([intent(n) for n in range(1, 4)])
    await run_until(dispatcher, outcomes, 3)
    errors = {o.error for o in outcomes.values() if isinstance(o, Retry)}
    assert len(errors) == 1 and len(outcomes) == 3
    expected = "broker went away" if failure == "raises" else "returned 2 results for 3"
    assert expected in errors.pop()


async def _two_results(_intents: Sequence[Intent]) -> list[BaseException | None]:
    return [None, None]


async def test_watchdog_times_out_a_whole_batch_and_frees_its_slots():
    sink = BatchRecorder(max_batch=10)
    sink.release = anyio.Event()  # never set: the batch hangs
    dispatcher, outcomes = make(4, {"k": sink}, timeout=0.1)
    dispatcher.dispatch([intent(1), intent(2)])
    await run_until(dispatcher, outcomes, 2)
    assert all(
        isinstance(o, Retry) and o.error == "delivery timed out after 0.1s"
        for o in outcomes.values()
    )
    assert dispatcher.free == 4


async def test_batching_sink_through_the_relay(db, names: Names, start_relay):
    sink = BatchRecorder(max_batch=50, fail={3: PermanentError("refused")})
    async with start_relay({"batched": sink}, concurrency=64):
        await db.execute(
            f'INSERT INTO "{names.schema}".intent (kind, payload) '
            "SELECT 'batched', '{}' FROM generate_series(1, 500)"
        )
        await wait_until(lambda: _counts_are(db, names, {"sent": 499, "dead": 1}), timeout=30)
    assert sorted(i for call in sink.calls for i in call) == list(range(1, 501))
    assert max(len(call) for call in sink.calls) > 1  # pipelined, not one by one
    assert max(len(call) for call in sink.calls) <= 50


async def _counts_are(db, names: Names, expected: dict[str, int]) -> bool:
    return await count_by_status(db, names) == expected
