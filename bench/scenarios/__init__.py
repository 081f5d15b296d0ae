"""One module per measurement; each has ``TITLE``, ``METRICS`` and ``async run(ctx) -> rows``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import ModuleType

from bench.context import Context
from bench.figures import Row
from bench.scenarios import (
    alternatives,
    backlog,
    drain,
    email,
    idle,
    latency,
    lost_notification,
    monitoring,
    ordering,
    producer_cost,
    sinks,
    tracing,
    xmin,
)

Scenario = Callable[[Context], Awaitable[list[Row]]]

# In the order docs/performance.md's table lists them.
SCENARIOS: dict[str, ModuleType] = {
    "drain": drain,
    "latency": latency,
    "lost-notification": lost_notification,
    "producer-cost": producer_cost,
    "idle": idle,
    "email": email,
    "alternatives": alternatives,
    "sinks": sinks,
    "ordering": ordering,
    "backlog": backlog,
    "http": monitoring,
    "tracing": tracing,
    "xmin": xmin,
}
