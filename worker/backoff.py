"""Retry delays: exponential, capped, jittered. Pure functions."""

from __future__ import annotations

import random
from collections.abc import Callable


def retry_delay(
    attempt: int, *, base: float, cap: float, rand: Callable[[], float] = random.random
) -> float:
    """Delay before retry number ``attempt`` (1-based).

    "Equal jitter": half of the nominal delay is fixed and half random, so a burst of
    failures spreads out but never comes back sooner than half the nominal delay.
    """
    nominal = min(cap, base * 2.0 ** min(attempt - 1, 62))
    return nominal / 2 + rand() * nominal / 2


def jittered(
    seconds: float, spread: float = 0.2, rand: Callable[[], float] = random.random
) -> float:
    """``seconds`` plus up to ``spread`` (a fraction) more, so many processes don't poll in
    lockstep; never less, so a poll interval is a true bound on the idle query rate."""
    return seconds * (1 + spread * rand())
