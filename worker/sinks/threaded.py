"""A plain (blocking) function as a handler: run in daemon threads of its own, off the loop.

``Handlers.register(kind, threads=N)`` wraps the function in ``Threaded``. Not
``anyio.to_thread.run_sync``: a thread cannot be cancelled, and anyio lets a cancelled call
(a delivery timeout) release its place while the thread runs on, so a handler that hangs
would start a new thread at every retry; and anyio's threads are not daemons, so one hung
call would keep the stopped worker from exiting. Here a kind never has more than N
threads, the ones that outlived their timeout included: a delivery waits for a free one
(within its timeout), and the process exits without waiting for any.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel

from worker.intent import Intent


@dataclass(eq=False)
class _Call:
    intent: Intent
    token: anyio.lowlevel.EventLoopToken
    done: anyio.Event = field(default_factory=anyio.Event)
    abandoned: bool = False  # its delivery was cancelled (timed out, or the worker stopped)
    error: BaseException | None = None

    def finish(self, error: BaseException | None) -> None:  # on the event loop
        self.error = error
        self.done.set()


class Threaded:
    """An async handler that calls ``fn(intent)`` in one of at most ``threads`` threads."""

    def __init__(self, fn: Callable[[Intent], Any], threads: int) -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        functools.update_wrapper(self, fn)
        self._fn = fn
        self._threads = threads
        self._calls: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._started = 0

    async def __call__(self, intent: Intent) -> None:
        call = _Call(intent, anyio.lowlevel.current_token())
        if self._started < self._threads:  # one more thread per call until there are N
            self._started += 1
            name = f"outbox handler {getattr(self._fn, '__name__', '')}"
            threading.Thread(target=self._work, name=name, daemon=True).start()
        self._calls.put(call)
        try:
            await call.done.wait()
        except BaseException:
            call.abandoned = True  # not started yet: it never will be; else it runs on
            raise
        if call.error is not None:
            raise call.error

    def _work(self) -> None:
        while True:
            call = self._calls.get()
            if call.abandoned:
                continue
            error: BaseException | None = None
            try:
                self._fn(call.intent)
            except Exception as exc:  # the handler's outcome, raised on the loop
                error = exc
            except BaseException as exc:  # SystemExit, KeyboardInterrupt: not the worker's end
                error = RuntimeError(f"the handler raised {type(exc).__name__}: {exc}")
            if call.abandoned:
                continue
            # RuntimeError: the event loop has finished, nobody waits for the outcome.
            with contextlib.suppress(RuntimeError):
                anyio.from_thread.run_sync(call.finish, error, token=call.token)
