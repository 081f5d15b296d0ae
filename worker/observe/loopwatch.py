"""A watchdog for the event loop: a thread that notices when the loop stops turning.

A handler that calls ``time.sleep()`` or a blocking HTTP client holds the event loop, and
with it everything in the process: the other slots, the heartbeat that keeps our leases,
the LISTEN connection's ping. Nothing inside the loop can notice, so the loop bumps a
timestamp a few times a second and a daemon thread checks it. When it is older than the
threshold the thread logs a warning naming the delivery that holds the loop (found on the
loop thread's stack, so no bookkeeping on the delivery path) with that stack, and another
with the length of the stall when the loop turns again. Both go to ``Stats`` for the
dashboard and the metrics.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from types import FrameType
from typing import TYPE_CHECKING

import anyio

from worker.intent import Intent

if TYPE_CHECKING:
    from worker.observe.stats import Stats

log = logging.getLogger("outbox.loopwatch")

# Given the loop thread's frames (innermost first): what is delivered there, and the
# position of its slot's frame (worker.relay.dispatch.Dispatcher.running).
Locate = Callable[[Sequence[FrameType]], tuple[Intent | list[Intent], int] | None]

HOW_TO_FIX = "run blocking code in a thread (docs/kinds/handlers.md: Blocking code in handlers)"


@dataclass(frozen=True, slots=True)
class LoopStall:
    """The event loop not turning: what held it, and where."""

    since: float  # monotonic: the loop's last turn before it
    culprit: str  # "order_created #123", or "code outside any delivery"
    where: str  # the innermost line of the loop thread's stack
    ended: float | None = None  # monotonic: the first turn after it


@dataclass(frozen=True, slots=True)
class StallView:
    culprit: str
    where: str
    seconds: float  # how long the loop was blocked (so far, if it still is)
    ago: float | None  # since it turned again; None while it is still blocked


def stall_view(now: float, stall: LoopStall | None) -> StallView | None:
    if stall is None:
        return None
    end = now if stall.ended is None else stall.ended
    ago = None if stall.ended is None else max(0.0, now - stall.ended)
    return StallView(stall.culprit, stall.where, end - stall.since, ago)


class LoopWatch:
    def __init__(self, threshold: float, stats: Stats, locate: Locate) -> None:
        self.threshold = threshold
        # How often the loop beats and the thread looks: a stall is reported within
        # threshold + interval, and its length is known to within an interval.
        # (At least 10 ms: a tiny --loop-block-warning must not turn it into a busy loop.)
        self.interval = max(0.01, min(threshold / 4, 0.25))
        self._stats = stats
        self._locate = locate
        self._beat = time.monotonic()

    async def run(self) -> None:
        """Beat until cancelled; the watching thread lives exactly as long."""
        stop = threading.Event()
        thread = threading.Thread(
            target=self._watch,
            args=(threading.get_ident(), stop),
            name="outbox-loopwatch",
            daemon=True,  # never keeps the process alive
        )
        self._beat = time.monotonic()
        thread.start()
        try:
            while True:
                self._beat = time.monotonic()
                await anyio.sleep(self.interval)
        finally:
            stop.set()
            thread.join(self.interval)  # it wakes at once; never wait long on the loop

    def _watch(self, loop_thread: int, stop: threading.Event) -> None:
        stall: LoopStall | None = None
        while not stop.wait(self.interval):
            beat = self._beat  # one read: the loop may write it any time
            if stall is None:
                if time.monotonic() - beat > self.threshold:
                    stall = self._stalled(loop_thread, beat)
            elif beat != stall.since:
                self._turned(replace(stall, ended=beat))
                stall = None

    def _stalled(self, loop_thread: int, since: float) -> LoopStall:
        stack = _stack(sys._current_frames().get(loop_thread))
        found = self._locate(stack)
        if found is None:
            culprit, inside = "code outside any delivery", stack
        else:
            work, depth = found
            culprit, inside = _describe(work), stack[:depth]
        where = _where(stack[0]) if stack else "unknown"
        stall = LoopStall(since, culprit, where)
        self._stats.on_loop_stalled(stall)
        record = log.makeRecord(
            log.name,
            logging.WARNING,
            __file__,
            0,
            "event loop blocked for %.1f s (--loop-block-warning %g) by %s, at %s: other "
            "deliveries, lease heartbeats and the LISTEN ping are all waiting; %s",
            (time.monotonic() - since, self.threshold, culprit, where, HOW_TO_FIX),
            None,
            sinfo=_format(inside or stack),
        )
        log.handle(record)
        return stall

    def _turned(self, stall: LoopStall) -> None:
        assert stall.ended is not None
        self._stats.on_loop_turned(stall)
        log.warning(
            "event loop turning again after %.1f s blocked by %s, at %s",
            stall.ended - stall.since,
            stall.culprit,
            stall.where,
        )


def _stack(frame: FrameType | None) -> list[FrameType]:
    """The frames from ``frame`` outwards (innermost first)."""
    frames = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    return frames


def _describe(work: Intent | list[Intent]) -> str:
    if isinstance(work, Intent):
        return f"{work.kind} #{work.id}"
    more = f" and {len(work) - 1} more of its batch" if len(work) > 1 else ""
    return f"{work[0].kind} #{work[0].id}{more}"


def _where(frame: FrameType) -> str:
    return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"


def _format(frames: Sequence[FrameType]) -> str:
    summary = traceback.StackSummary.extract((f, f.f_lineno) for f in reversed(frames))
    return "Event loop thread (most recent call last):\n" + "".join(summary.format()).rstrip()
