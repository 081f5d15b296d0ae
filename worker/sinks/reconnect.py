"""One task (re)connects while the others wait; failed connects back off, and an outage is
told in two log lines: when the broker goes down and when it is back.

A sink with one connection per worker (NATS, RabbitMQ) has many deliveries in flight. When
the connection is gone they all want to reconnect at once. With a plain lock each would, in
turn, spend a whole connect timeout on a broker that is down. :class:`ConnectGate` lets the
first one try; a task that was already waiting for the lock when that attempt failed gets the
same :class:`TransientError` at once instead of trying again itself.

After a failed connect the gate waits before it tries again, longer after each failure
(``retry_delay``, up to ``cap`` seconds): a delivery that comes sooner fails at once with the
last error, as transient (the relay retries the intent with its own backoff). So a broker
that is down for a minute costs a handful of connects, not one per intent and retry, and the
log says "down" once and "back" once, whatever the traffic.

Usage::

    async with self._gate.turn() as turn:      # holds the gate's lock
        if not connected:
            self._conn = await turn.connect(self._connect)
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import anyio

from worker.errors import TransientError
from worker.observe.outage import BROKER, Outage

__all__ = ["ConnectGate", "ConnectTurn"]

T = TypeVar("T")


class ConnectGate:
    """The lock around a sink's connection, the last connect failure, and the outage it is
    part of (``what`` names the broker in the log lines, e.g. "RabbitMQ rabbit:5672")."""

    def __init__(
        self,
        what: str = "the broker",
        log: logging.Logger | None = None,
        *,
        base: float = 0.5,
        cap: float = 10.0,
    ) -> None:
        self.lock = anyio.Lock()
        self.what = what
        self._outage = Outage(
            log or logging.getLogger(__name__), what, base=base, cap=cap, words=BROKER
        )
        # (anyio.current_time() when it failed, the error) of the last failed connect.
        self._failure: tuple[float, TransientError] | None = None
        self._next_try = 0.0  # no connect before this (anyio.current_time())

    @property
    def down(self) -> bool:
        return self._outage.failures > 0

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[ConnectTurn]:
        """Wait for the lock and hold it for the body; the turn remembers when we started
        waiting, so that :meth:`ConnectTurn.connect` can tell which failures we waited for."""
        waiting_since = anyio.current_time()
        async with self.lock:
            yield ConnectTurn(self, waiting_since)

    def _failed(self, exc: TransientError) -> None:
        now = anyio.current_time()
        self._failure = (now, exc)
        self._next_try = now + self._outage.failed(str(exc).removeprefix(f"{self.what}: "))

    def _connected(self) -> None:
        self._outage.recovered()
        self._failure = None


class ConnectTurn:
    """One task's hold on a :class:`ConnectGate` (only valid inside ``gate.turn()``)."""

    def __init__(self, gate: ConnectGate, waiting_since: float) -> None:
        self._gate = gate
        self._waiting_since = waiting_since

    async def connect(self, connect: Callable[[], Awaitable[T]]) -> T:
        """Run ``connect()``, unless a connect failed while this task waited for the lock, or
        the gate is backing off after a failure: then raise that failure again. A
        :class:`TransientError` from ``connect()`` is recorded, and propagates."""
        gate = self._gate
        failure = gate._failure
        if failure is not None:
            wait = gate._next_try - anyio.current_time()
            if failure[0] >= self._waiting_since:
                # It failed while we waited: share the verdict rather than spend
                # another connect timeout each, one after the other.
                raise TransientError(str(failure[1])) from None
            if wait > 0:
                raise TransientError(f"{failure[1]} (next connect in {wait:.1f}s)") from None
        try:
            connection = await connect()
        except TransientError as exc:
            gate._failed(exc)
            raise
        gate._connected()
        return connection
