"""What happened to one delivery: sent, retried later, dead, or released unattempted. Plain
values, read by the relay (which decides them), the store (which writes them) and the stats."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Sent:
    pass


@dataclass(frozen=True, slots=True)
class Retry:
    delay: float
    error: str


@dataclass(frozen=True, slots=True)
class Dead:
    error: str


@dataclass(frozen=True, slots=True)
class Released:
    """Handed back without an outcome (shutdown, or its kind at its limit), due again in
    ``delay`` seconds; the attempt is refunded."""

    delay: float = 0.0


Outcome = Sent | Retry | Dead | Released
SENT = Sent()  # the common case needs no new object
