"""Delivery slots: claimed intents in, outcomes out, scheduled per batch, not per intent.

The claim loop hands each claimed batch to ``dispatch``; it lands in one deque. N
long-lived slot tasks take work from it. A slot that takes an item while more wait wakes
one sleeping slot, so a burst fans out one wake-up at a time, and a sink that never
suspends (a no-op handler) lets one slot run a whole batch in one turn of the loop. There
is no memory stream, no event per hand-off and no cancel scope per delivery: one watchdog
cancels the few deliveries that overrun their deadline.

A sink that can pipeline (``BatchSink``) gets its intents in chunks of up to its
``max_batch``: one slot task, many deliveries in flight. Every intent counts against
``--concurrency`` either way.
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import TYPE_CHECKING

import anyio

from worker.errors import TransientError
from worker.intent import Intent
from worker.observe.stats import Stats
from worker.outcome import SENT, Outcome
from worker.relay.delivery import RetryPolicy, classify, unknown_kind
from worker.sinks.base import BatchSink, Sink

if TYPE_CHECKING:  # imported only when tracing is on
    from worker.observe.otel import DeliveryTracer

Work = Intent | list[Intent]  # a list is one BatchSink.deliver_many call
OnOutcome = Callable[[Intent, Outcome], None]


class Dispatcher:
    def __init__(
        self,
        *,
        concurrency: int,
        sinks: Mapping[str, Sink],
        policy: RetryPolicy,
        timeout: float,
        stats: Stats,
        on_outcome: OnOutcome,
        tracer: DeliveryTracer | None = None,
    ) -> None:
        self.concurrency = concurrency
        self._sinks = sinks
        self._batching = {k: s.max_batch for k, s in sinks.items() if isinstance(s, BatchSink)}
        self._policy = policy
        self._timeout = timeout
        self._stats = stats
        self._on_outcome = on_outcome
        self._tracer = tracer  # None: no spans, and no cost but a None test or two
        self._ready: deque[Work] = deque()
        self._sleepers: list[anyio.Event] = []  # idle slots, woken last-in first-out
        self._waking = 0  # slots woken that have not run yet
        self._taken = 0  # intents dispatched whose delivery has not ended
        self._closed = False
        self._freed: anyio.Event | None = None  # the claim loop waits for a free slot
        self._watch: anyio.Event | None = None  # the watchdog waits for work
        self._current: list[Work | None] = [None] * concurrency
        # time.monotonic(), not anyio.current_time(): half the price, on every delivery.
        self._deadline = [math.inf] * concurrency
        self._scopes: list[anyio.CancelScope | None] = [None] * concurrency
        self._frames: list[FrameType | None] = [None] * concurrency  # each slot's _slot frame

    # --- the claim loop's side ---------------------------------------------------------

    @property
    def free(self) -> int:
        """How many more intents may be claimed now."""
        return self.concurrency - self._taken

    async def wait_for_free(self) -> None:
        """Until a delivery ends (or ``interrupt``)."""
        if self._taken < self.concurrency:
            return
        self._freed = anyio.Event()
        try:
            await self._freed.wait()
        finally:
            self._freed = None

    def interrupt(self) -> None:
        """Wake ``wait_for_free`` now (the relay is stopping)."""
        if self._freed is not None:
            self._freed.set()

    def dispatch(self, intents: Sequence[Intent]) -> None:
        batches: dict[str, list[Intent]] = {}
        for intent in intents:
            if intent.kind not in self._sinks:
                outcome = unknown_kind(intent, self._sinks)
                if self._tracer is not None:
                    self._tracer.finish(intent, outcome)
                self._on_outcome(intent, outcome)
                continue
            self._taken += 1
            limit = self._batching.get(intent.kind)
            if limit is None:
                self._ready.append(intent)
                continue
            batch = batches.get(intent.kind)
            if batch is None or len(batch) >= limit:
                batch = batches[intent.kind] = []
                self._ready.append(batch)
            batch.append(intent)
        self._wake_one()
        if self._watch is not None:
            self._watch.set()

    def close(self) -> None:
        """No more work: slots exit once the deque is empty."""
        self._closed = True
        self._waking += len(self._sleepers)
        for sleeper in self._sleepers:
            sleeper.set()
        self._sleepers.clear()

    # --- the slots ----------------------------------------------------------------------

    async def run(self) -> None:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watchdog)
                async with anyio.create_task_group() as slots:
                    for index in range(self.concurrency):
                        slots.start_soon(self._slot, index)
                tg.cancel_scope.cancel()
        finally:
            if self._tracer is not None:
                self._tracer.abandon()

    async def _slot(self, index: int) -> None:
        # Set once per slot, not per delivery: ``running`` finds it on a blocked loop's stack.
        self._frames[index] = sys._getframe()
        try:
            while True:
                # One scope for as long as no delivery of this slot overruns: the watchdog
                # cancels it, and only then does the slot open a new one.
                with anyio.CancelScope() as scope:
                    self._scopes[index] = scope
                    await self._serve(index, scope)
                if not scope.cancel_called:
                    return
                self._overran(index)
        finally:
            self._frames[index] = None

    async def _serve(self, index: int, scope: anyio.CancelScope) -> None:
        ready = self._ready
        while not scope.cancel_called:  # a sink that swallowed our cancellation
            if not ready:
                if self._closed:
                    return
                sleeper = anyio.Event()
                self._sleepers.append(sleeper)
                try:
                    await sleeper.wait()
                finally:
                    if sleeper.is_set():
                        self._waking -= 1
                    else:  # cancelled in its sleep
                        self._sleepers.remove(sleeper)
                continue
            work = ready.popleft()
            self._wake_one()
            if self._tracer is not None:  # the sink sees the delivery span's trace context
                start = self._tracer.start
                work = [start(i) for i in work] if isinstance(work, list) else start(work)
            self._current[index] = work
            self._deadline[index] = time.monotonic() + self._timeout
            if type(work) is list:
                self._stats.on_delivery_start(index, work[0])
                outcomes = await self._deliver_many(work)
            else:
                assert isinstance(work, Intent)
                self._stats.on_delivery_start(index, work)
                outcomes = [(work, await self._deliver(work))]
            self._end(index, outcomes)

    def _wake_one(self) -> None:
        """More work than running slots: wake one sleeping slot, unless one is waking
        already (a slot that runs without suspending would otherwise wake them all)."""
        if self._ready and self._sleepers and not self._waking:
            self._waking += 1
            self._sleepers.pop().set()

    async def _deliver(self, intent: Intent) -> Outcome:
        try:
            if self._tracer is None:
                await self._sinks[intent.kind].deliver(intent)
            else:
                with self._tracer.current(intent):
                    await self._sinks[intent.kind].deliver(intent)
        except Exception as exc:  # a sink's failure is data, never a worker crash
            return classify(intent, exc, self._policy)
        return SENT

    async def _deliver_many(self, batch: list[Intent]) -> list[tuple[Intent, Outcome]]:
        sink = self._sinks[batch[0].kind]
        assert isinstance(sink, BatchSink)
        try:
            results = await sink.deliver_many(batch)
            if len(results) != len(batch):
                raise RuntimeError(
                    f"{batch[0].kind} sink returned {len(results)} results for {len(batch)}"
                )
        except Exception as exc:
            results = [exc] * len(batch)
        policy = self._policy
        return [
            (intent, SENT if error is None else classify(intent, error, policy))
            for intent, error in zip(batch, results, strict=True)
        ]

    def _end(self, index: int, outcomes: list[tuple[Intent, Outcome]]) -> None:
        self._current[index] = None
        self._deadline[index] = math.inf
        self._stats.on_delivery_end(index, len(outcomes))
        self._taken -= len(outcomes)
        tracer = self._tracer
        for intent, outcome in outcomes:
            if tracer is not None:
                tracer.finish(intent, outcome)
            self._on_outcome(intent, outcome)
        if self._freed is not None:
            self._freed.set()

    def running(self, stack: Sequence[FrameType]) -> tuple[Work, int] | None:
        """For the loop watchdog's thread while the event loop is blocked: the work of the
        slot whose code ``stack`` (the loop thread's frames, innermost first) is in, and the
        position of that slot's frame in it; None outside any delivery. Reads only what the
        blocked loop cannot be changing."""
        slots = {id(frame): index for index, frame in enumerate(self._frames) if frame}
        for depth, frame in enumerate(stack):
            index = slots.get(id(frame))
            if index is not None:
                work = self._current[index]
                return None if work is None else (work, depth)
        return None

    # --- timeouts -----------------------------------------------------------------------

    async def _watchdog(self) -> None:
        """Cancel the deliveries past their deadline; asleep while nothing is in flight."""
        tick = min(0.1, self._timeout / 4)
        while True:
            if self._taken == 0:
                self._watch = anyio.Event()
                try:
                    await self._watch.wait()
                finally:
                    self._watch = None
                continue
            await anyio.sleep(tick)
            now = time.monotonic()
            for index, deadline in enumerate(self._deadline):
                if deadline <= now:
                    self._deadline[index] = math.inf  # cancel once
                    scope = self._scopes[index]
                    if scope is not None:
                        scope.cancel()

    def _overran(self, index: int) -> None:
        work = self._current[index]
        if work is None:  # the sink returned after all; its outcome is recorded
            return
        error = TransientError(f"delivery timed out after {self._timeout:g}s")
        batch = work if isinstance(work, list) else [work]
        self._end(index, [(i, classify(i, error, self._policy)) for i in batch])
