"""One task (re)connects while the others wait; a failed connect is shared with the waiters.

A sink with one connection per worker (NATS, RabbitMQ) has many deliveries in flight. When
the connection is gone they all want to reconnect at once. With a plain lock each would, in
turn, spend a whole connect timeout on a broker that is down. :class:`ConnectGate` lets the
first one try; a task that was already waiting for the lock when that attempt failed gets the
same :class:`TransientError` at once instead of trying again itself. A task that arrives
after the failure does try again (the broker may be back).

Usage::

    async with self._gate.turn() as turn:      # holds the gate's lock
        if not connected:
            self._conn = await turn.connect(self._connect)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import anyio

from worker.errors import TransientError

__all__ = ["ConnectGate", "ConnectTurn"]

T = TypeVar("T")


class ConnectGate:
    """The lock around a sink's connection, and the last connect failure with its time."""

    def __init__(self) -> None:
        self.lock = anyio.Lock()
        # (anyio.current_time() when it failed, the error) of the last failed connect.
        self._failure: tuple[float, TransientError] | None = None

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[ConnectTurn]:
        """Wait for the lock and hold it for the body; the turn remembers when we started
        waiting, so that :meth:`ConnectTurn.connect` can tell which failures we waited for."""
        waiting_since = anyio.current_time()
        async with self.lock:
            yield ConnectTurn(self, waiting_since)


class ConnectTurn:
    """One task's hold on a :class:`ConnectGate` (only valid inside ``gate.turn()``)."""

    def __init__(self, gate: ConnectGate, waiting_since: float) -> None:
        self._gate = gate
        self._waiting_since = waiting_since

    async def connect(self, connect: Callable[[], Awaitable[T]]) -> T:
        """Run ``connect()``, unless a connect failed while this task waited for the lock:
        then raise that failure again. A :class:`TransientError` from ``connect()`` is
        recorded for the tasks waiting now, and propagates."""
        failure = self._gate._failure
        if failure is not None and failure[0] >= self._waiting_since:
            # It failed while we waited: share the verdict rather than spend
            # another connect timeout each, one after the other.
            raise TransientError(str(failure[1])) from None
        try:
            return await connect()
        except TransientError as exc:
            self._gate._failure = (anyio.current_time(), exc)
            raise
