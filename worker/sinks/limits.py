"""Per-kind limits around any Sink: at most N deliveries at once, at most R per period, and
a per-delivery timeout.

Configured as one string, ``KIND:key=value,...`` entries separated by ``;``::

    email:rate=10/s;webhook:concurrency=4,rate=50/min,timeout=10,max_bytes=20MB

``max_bytes`` is not enforced here but by the kind's sink, on the bytes it is about to send
(worker/sinks/size.py).

Limits are per worker process: with three processes, ``rate=10/s`` allows 30/s in total.
A delivery never waits for its turn inside a relay slot: when its kind is at its limit the
intent is deferred (back to pending, attempt refunded, due again shortly), and the claim
skips kinds that are at their limit, so a backlog of a tightly limited kind never holds up
the intents of other kinds behind it.

A sink that batches (``BatchSink``) stays one under its limits: a chunk takes its tokens at
once, one per intent, and only the intents that get none now are deferred.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import anyio
from aiolimiter import AsyncLimiter

from worker.errors import ConfigError, Deferred, TransientError
from worker.intent import Intent
from worker.sinks.base import BatchSink, Sink
from worker.sinks.handlers import HandlerSink
from worker.sinks.size import parse_size

__all__ = [
    "KindLimits",
    "LimitedBatchSink",
    "LimitedSink",
    "apply_limits",
    "limit_sink",
    "parse_limits",
]

_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_KIND_RE = re.compile(r"[A-Za-z0-9_.-]+")
_RATE_RE = re.compile(r"(?P<count>[0-9]+(?:\.[0-9]+)?)(?:/(?P<unit>[a-z]+))?")


@dataclass(frozen=True, slots=True)
class KindLimits:
    concurrency: int | None = None  # deliveries of this kind in flight at once
    rate: float | None = None  # deliveries started per `per` seconds
    per: float = 1.0
    timeout: float | None = None  # seconds one delivery may take, once it has its turn
    max_bytes: int | None = None  # largest message the kind's sink sends (worker/sinks/size.py)

    @property
    def paces(self) -> bool:
        """Whether deliveries need the LimitedSink wrapper (max_bytes is the sink's own)."""
        return not (self.concurrency is None and self.rate is None and self.timeout is None)

    def describe(self) -> str:
        parts = []
        if self.concurrency is not None:
            parts.append(f"concurrency={self.concurrency}")
        if self.rate is not None:
            parts.append(f"rate={self.rate:g}/{self.per:g}s")
        if self.timeout is not None:
            parts.append(f"timeout={self.timeout:g}s")
        if self.max_bytes is not None:
            parts.append(f"max_bytes={self.max_bytes}")
        return ",".join(parts) or "unlimited"


def _positive(kind: str, key: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"--limits {kind}: {key}={text!r} must be a positive number")
    return value


def _parse_entry(kind: str, body: str) -> KindLimits:
    concurrency: int | None = None
    rate: float | None = None
    per = 1.0
    timeout: float | None = None
    max_bytes: int | None = None
    seen: set[str] = set()
    for item in body.split(","):
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq or not value:
            raise ConfigError(f"--limits {kind}: expected key=value, got {item.strip()!r}")
        if key in seen:
            raise ConfigError(f"--limits {kind}: {key} given twice")
        seen.add(key)
        if key == "concurrency":
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"--limits {kind}: concurrency must be a positive integer")
            concurrency = int(value)
        elif key == "rate":
            match = _RATE_RE.fullmatch(value)
            unit = (match and match["unit"]) or "s"
            if not match or unit not in _UNITS:
                raise ConfigError(f"--limits {kind}: rate={value!r}: expected N, N/s, N/min or N/h")
            rate = _positive(kind, "rate", match["count"])
            per = _UNITS[unit]
        elif key == "timeout":
            timeout = _positive(kind, "timeout", value.removesuffix("s"))
        elif key == "max_bytes":
            max_bytes = parse_size(kind, value)
        else:
            raise ConfigError(
                f"--limits {kind}: unknown key {key!r} (use concurrency, rate, timeout, max_bytes)"
            )
    return KindLimits(concurrency, rate, per, timeout, max_bytes)


def parse_limits(text: str | None) -> dict[str, KindLimits]:
    """``"email:rate=10/s;webhook:concurrency=4,timeout=10"`` -> limits by kind."""
    limits: dict[str, KindLimits] = {}
    for entry in (text or "").split(";"):
        if not entry.strip():
            continue
        kind, colon, body = (part.strip() for part in entry.partition(":"))
        if not colon or not _KIND_RE.fullmatch(kind) or not body:
            raise ConfigError(
                f"--limits: expected KIND:key=value[,key=value], got {entry.strip()!r}"
            )
        if kind in limits:
            raise ConfigError(f"--limits: kind {kind!r} given twice")
        limits[kind] = _parse_entry(kind, body)
    return limits


# How soon a deferred intent is due again when its kind has no free concurrency slot.
_DEFER_FOR_SLOT = 0.2

T = TypeVar("T")


class LimitedSink:
    """Wraps one kind's sink: takes a concurrency slot and a rate token without waiting
    (else ``Deferred``), then runs the delivery under the timeout."""

    def __init__(self, kind: str, sink: Sink, limits: KindLimits) -> None:
        self.kind = kind
        self.sink = sink
        self.limits = limits
        # A counter, not a semaphore: a batch takes many slots at once, and the loop is
        # single-threaded (nothing yields between the check and the count).
        self._in_flight = 0
        self._limiter: AsyncLimiter | None = None
        if limits.rate is not None:
            # aiolimiter cannot hand out a whole token from a bucket smaller than one:
            # express 0.5/s as 1 per 2 s.
            count = max(limits.rate, 1.0)
            self._limiter = AsyncLimiter(count, limits.per * count / limits.rate)
        self._token_interval = limits.per / limits.rate if limits.rate else 0.0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.kind!r}, {self.sink!r}, {self.limits.describe()})"

    def saturated(self) -> bool:
        """A delivery of this kind started now would be deferred: the relay's claim skips
        the kind until this turns false."""
        if self.limits.concurrency is not None and self._in_flight >= self.limits.concurrency:
            return True
        return self._limiter is not None and not self._limiter.has_capacity()

    async def deliver(self, intent: Intent) -> None:
        _granted, deferred = await self._take(1)
        if deferred is not None:
            raise deferred
        try:
            await self._timed(self.sink.deliver(intent))
        finally:
            self._in_flight -= 1

    async def _take(self, wanted: int) -> tuple[int, Deferred | None]:
        """Start up to ``wanted`` deliveries now, without waiting: count them in flight and
        take their rate tokens. Returns how many may start and, if fewer than ``wanted``,
        the ``Deferred`` for the rest."""
        granted, deferred = wanted, None
        if self.limits.concurrency is not None:
            free = max(self.limits.concurrency - self._in_flight, 0)
            if free < wanted:
                granted = free
                deferred = Deferred(
                    f"{self.kind}: concurrency limit reached", retry_after=_DEFER_FOR_SLOT
                )
        if self._limiter is not None and granted:
            tokens = _tokens_now(self._limiter, granted)
            if tokens < granted:
                granted = tokens
                deferred = Deferred(
                    f"{self.kind}: rate limit reached", retry_after=self._token_interval
                )
            if granted:
                await self._limiter.acquire(granted)  # has capacity: returns without waiting
        self._in_flight += granted
        return granted, deferred

    async def _timed(self, delivery: Awaitable[T]) -> T:
        """``delivery`` under the kind's timeout (one for a whole batch)."""
        if self.limits.timeout is None:
            return await delivery
        with anyio.move_on_after(self.limits.timeout):
            return await delivery
        raise TransientError(
            f"{self.kind} delivery timed out after {self.limits.timeout:g}s (--limits)"
        )

    async def aclose(self) -> None:
        await self.sink.aclose()


class LimitedBatchSink(LimitedSink):
    """A ``LimitedSink`` around a ``BatchSink`` that is one itself, so the relay keeps
    handing it chunks: a chunk takes a slot and a token per intent (``concurrency=N`` stays
    "at most N intents of this kind in flight", as the relay's ``--concurrency`` counts
    them), the part that gets none now is deferred, and the timeout covers the chunk."""

    def __init__(self, kind: str, sink: BatchSink, limits: KindLimits) -> None:
        super().__init__(kind, sink, limits)
        self._batch_sink = sink
        # No bigger than the limits allow at once: a larger chunk would always be cut.
        caps = [sink.max_batch]
        if limits.concurrency is not None:
            caps.append(limits.concurrency)
        if self._limiter is not None:
            caps.append(max(int(self._limiter.max_rate), 1))
        self.max_batch = min(caps)

    async def deliver_many(self, intents: Sequence[Intent]) -> Sequence[BaseException | None]:
        granted, deferred = await self._take(len(intents))
        rest = [deferred] * (len(intents) - granted)
        if not granted:
            return rest
        results: Sequence[BaseException | None]
        try:
            results = await self._timed(self._batch_sink.deliver_many(intents[:granted]))
        except Exception as exc:  # as the relay would: every intent of the chunk fails with it
            results = [exc] * granted
        finally:
            self._in_flight -= granted
        return [*results, *rest]


def _tokens_now(limiter: AsyncLimiter, wanted: int) -> int:
    """How many of ``wanted`` tokens the bucket holds now (aiolimiter only answers yes or no
    for an amount, and refuses one above its size, which this never exceeds)."""
    if limiter.has_capacity(wanted):
        return wanted
    low, high = 0, wanted - 1
    while low < high:
        mid = (low + high + 1) // 2
        if limiter.has_capacity(mid):
            low = mid
        else:
            high = mid - 1
    return low


def limit_sink(kind: str, sink: Sink, limits: KindLimits) -> LimitedSink:
    """The wrapper that fits ``sink``: one that still batches if ``sink`` does."""
    if isinstance(sink, BatchSink):
        return LimitedBatchSink(kind, sink, limits)
    return LimitedSink(kind, sink, limits)


def apply_limits(sinks: dict[str, Sink], limits: dict[str, KindLimits]) -> dict[str, Sink]:
    """Wrap the sinks that have limits; a limit for a kind with no sink is a mistake."""
    unknown = sorted(set(limits) - set(sinks))
    if unknown:
        raise ConfigError(
            f"--limits names kinds with no sink or handler: {', '.join(unknown)} "
            f"(known: {', '.join(sorted(sinks))})"
        )
    for kind, sink in sinks.items():
        if kind in limits and limits[kind].max_bytes is not None and isinstance(sink, HandlerSink):
            raise ConfigError(
                f"--limits {kind}: max_bytes applies to the built-in sinks; your handler gets "
                "the decoded payload and decides itself what is too big"
            )
    return {
        kind: limit_sink(kind, sink, limits[kind])
        if kind in limits and limits[kind].paces
        else sink
        for kind, sink in sinks.items()
    }
