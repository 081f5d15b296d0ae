"""In-process counters of what the relay is doing. No I/O: the relay calls the ``on_*``
hooks, logs and the dashboard read them."""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

from worker.intent import Intent
from worker.outcomes import Dead, Outcome, Released, Retry, Sent


@dataclass(slots=True)
class SlotState:
    intent_id: int
    kind: str
    since: float  # monotonic


@dataclass(frozen=True, slots=True)
class ErrorEntry:
    at: float  # wall clock
    kind: str
    intent_id: int
    reason: str


@dataclass(slots=True)
class Stats:
    concurrency: int
    started_at: float = field(default_factory=time.monotonic)
    claimed: int = 0
    sent: Counter[str] = field(default_factory=Counter)
    retried: Counter[str] = field(default_factory=Counter)
    dead: Counter[str] = field(default_factory=Counter)
    released: int = 0
    lease_lost: int = 0
    notifications: int = 0
    last_notification: float | None = None
    listener_connected: bool = False
    listener_reconnects: int = 0
    _listener_ever_connected: bool = False
    last_poll: float | None = None
    idle_declared: bool = False  # producers are asked to notify us
    slots: list[SlotState | None] = field(default_factory=list)
    errors: deque[ErrorEntry] = field(default_factory=lambda: deque(maxlen=20))

    def __post_init__(self) -> None:
        self.slots = [None] * self.concurrency

    def on_claim(self, n: int) -> None:
        self.claimed += n

    def on_delivery_start(self, slot: int, intent: Intent) -> None:
        self.slots[slot] = SlotState(intent.id, intent.kind, time.monotonic())

    def on_delivery_end(self, slot: int) -> None:
        self.slots[slot] = None

    def on_recorded(self, intent: Intent, outcome: Outcome) -> None:
        match outcome:
            case Sent():
                self.sent[intent.kind] += 1
            case Retry(_, error):
                self.retried[intent.kind] += 1
                self._error(intent, error)
            case Dead(error):
                self.dead[intent.kind] += 1
                self._error(intent, error)
            case Released():
                self.released += 1

    def on_lease_lost(self, n: int) -> None:
        self.lease_lost += n

    def on_notification(self) -> None:
        self.notifications += 1
        self.last_notification = time.monotonic()

    def on_listener(self, connected: bool) -> None:
        if connected and self._listener_ever_connected:
            self.listener_reconnects += 1
        self._listener_ever_connected |= connected
        self.listener_connected = connected

    def on_idle(self, declared: bool) -> None:
        self.idle_declared = declared

    def on_poll(self) -> None:
        self.last_poll = time.monotonic()

    def _error(self, intent: Intent, reason: str) -> None:
        self.errors.append(ErrorEntry(time.time(), intent.kind, intent.id, reason))
