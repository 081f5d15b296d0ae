"""In-process counters of what the relay is doing. No I/O: the relay calls the ``on_*``
hooks; logs and the dashboard read an immutable ``Snapshot``.

Rates and latencies live in per-second buckets over the last minute, so the hooks stay
O(1) at any throughput and a snapshot costs the same at 10 intents/s or 10,000.
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from worker.intent import Intent
from worker.logs import redact_text
from worker.observe.histogram import Histogram
from worker.observe.loopwatch import LoopStall, StallView, stall_view
from worker.observe.windows import WINDOW, Latency, SecondBuckets, latency_bin, percentiles
from worker.outcome import Dead, Outcome, Released, Retry, Sent
from worker.store.rows import DbHealth

RATE_NOW_SPAN = 5  # "now" is the average of the last complete seconds, so it does not jump


# user:password@ inside any URL an error message may quote (a broker URL in an exception).
def redact(text: str) -> str:
    """Passwords out of error text, where they stand (URLs, password= fields)."""
    return redact_text(text)


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
    reason: str  # already redacted
    outcome: str = "retry"  # "retry" | "dead"


@dataclass(frozen=True, slots=True)
class KindCounts:
    kind: str
    sent: int
    retried: int
    dead: int


@dataclass(frozen=True, slots=True)
class SlotView:
    index: int
    intent_id: int
    kind: str
    seconds: float  # how long it has been on this intent


@dataclass(frozen=True, slots=True)
class RetentionView:
    deleted: int  # since start, by this worker
    since_run: float | None  # seconds since its last round ran (None: not yet)
    skipped: int  # rounds left to another worker that held the lock


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the dashboard and the summary log line show, frozen at one instant."""

    taken_at: float  # wall clock
    uptime: float
    concurrency: int
    listen: bool  # LISTEN enabled at all (False: --no-listen, polling only)
    stopping: bool
    sent: int
    retried: int
    dead: int
    claimed: int
    released: int
    lease_lost: int
    rate_now: float  # sent/s over the last RATE_NOW_SPAN complete seconds
    rate_minute: float  # sent/s over the last minute (or since start)
    per_second: tuple[int, ...]  # sent in each of the last WINDOW complete seconds, oldest first
    retried_minute: int
    dead_minute: int
    latency: Latency
    slots: tuple[SlotView | None, ...]
    kinds: tuple[KindCounts, ...]
    errors: tuple[ErrorEntry, ...]  # newest first
    listener_connected: bool
    listener_reconnects: int
    notifications: int
    since_notification: float | None
    since_poll: float | None
    idle_declared: bool
    db: DbHealth | None
    db_age: float | None  # seconds since ``db`` was read
    db_error: str | None  # why the last read failed, if it did
    loop_stalls: int = 0  # times the event loop stopped turning for over the threshold
    loop_blocked_seconds: float = 0.0  # their total length, once each has ended
    loop_stall: StallView | None = None  # the latest one
    outcomes_unrecorded: int = 0  # delivered, waiting for the outcome writer
    claims_paused: float | None = None  # seconds the claim loop has waited for the writer
    claim_pauses: int = 0  # such stalls since start
    retention: RetentionView | None = None  # None: retention is off (both kept forever)

    @property
    def busy_slots(self) -> int:
        return sum(1 for s in self.slots if s is not None)


@dataclass(slots=True)
class Stats:
    concurrency: int
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    wall: Callable[[], float] = field(default=time.time, repr=False)
    started_at: float = field(init=False)
    claimed: int = 0
    claims: int = 0  # claim statements that returned rows
    sent: Counter[str] = field(default_factory=Counter)
    retried: Counter[str] = field(default_factory=Counter)
    dead: Counter[str] = field(default_factory=Counter)
    released: Counter[str] = field(default_factory=Counter)
    lease_lost: int = 0
    lease_rescues: int = 0  # expired leases (of any worker) this one returned to pending
    db_errors: Counter[str] = field(default_factory=Counter)  # by operation
    # Since start, for /metrics (the windows above cover the last minute only), by kind;
    # kept only when ``timings`` is on (--http): ~0.4 µs per intent that nobody else reads.
    timings: bool = False
    delivery_seconds: defaultdict[str, Histogram] = field(
        default_factory=lambda: defaultdict(Histogram)
    )
    commit_to_sent: defaultdict[str, Histogram] = field(
        default_factory=lambda: defaultdict(Histogram)
    )
    notifications: int = 0
    polls: int = 0
    last_notification: float | None = None
    listener_connected: bool = False
    listener_reconnects: int = 0
    _listener_ever_connected: bool = False
    last_poll: float | None = None
    idle_declared: bool = False  # producers are asked to notify us
    slots: list[SlotState | None] = field(default_factory=list)
    errors: deque[ErrorEntry] = field(default_factory=lambda: deque(maxlen=20))
    db: DbHealth | None = None
    db_read_at: float | None = None  # monotonic
    db_error: str | None = None
    seconds: SecondBuckets = field(default_factory=SecondBuckets, repr=False)
    loop_stalls: int = 0
    loop_blocked_seconds: float = 0.0
    loop_stall: LoopStall | None = None
    outcomes_unrecorded: int = 0  # set by worker.relay.inflight, the owner of the rows
    claims_paused_since: float | None = None  # the claim loop waits for the outcome writer
    claim_pauses: int = 0
    # Retention (worker/relay/retention.py): rows this worker deleted, by status; its rounds
    # (wall clock of the last one; rounds another worker's lock made it skip); the age of the
    # oldest sent and dead rows kept, as the last round saw them.
    retention_enabled: bool = False
    retention_deleted: Counter[str] = field(default_factory=Counter)
    retention_last_run: float | None = None  # wall clock
    retention_skipped: int = 0
    retention_oldest: dict[str, float | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.started_at = self.clock()
        self.slots = [None] * self.concurrency

    # --- hooks (called by the relay, the listener and the health reader) -------------------

    def on_claim(self, n: int) -> None:
        self.claims += 1
        self.claimed += n

    def on_delivery_start(self, slot: int, intent: Intent) -> None:
        self.slots[slot] = SlotState(intent.id, intent.kind, self.clock())

    def on_delivery_end(self, slot: int, n: int = 1) -> None:
        """``n``: intents delivered together (a batch sink's call); each took as long."""
        state = self.slots[slot]
        if self.timings and state is not None:
            self.delivery_seconds[state.kind].observe(self.clock() - state.since, n)
        self.slots[slot] = None

    def on_recorded_many(self, recorded: Iterable[tuple[Intent, Outcome]]) -> None:
        """``on_recorded`` for a written batch: the clocks are read once for all of it."""
        bucket = self.seconds.at(self.clock())
        wall = self.wall()
        sent, histogram = self.sent, bucket.latency
        by_kind = self.commit_to_sent if self.timings else None
        for intent, outcome in recorded:
            if type(outcome) is not Sent:
                self.on_recorded(intent, outcome)
                continue
            sent[intent.kind] += 1
            bucket.sent += 1
            # created_at is the database's clock; a skewed worker clock must not produce
            # negative latencies.
            latency = max(0.0, wall - intent.created_at.timestamp())
            histogram[latency_bin(latency)] += 1
            if by_kind is not None:
                by_kind[intent.kind].observe(latency)
            if latency > bucket.latency_max:
                bucket.latency_max = latency

    def on_recorded(self, intent: Intent, outcome: Outcome) -> None:
        match outcome:
            case Sent():
                self.on_recorded_many(((intent, outcome),))
            case Retry(_, error):
                self.retried[intent.kind] += 1
                self.seconds.at(self.clock()).retried += 1
                self._error(intent, error, "retry")
            case Dead(error):
                self.dead[intent.kind] += 1
                self.seconds.at(self.clock()).dead += 1
                self._error(intent, error, "dead")
            case Released():
                self.released[intent.kind] += 1

    def on_lease_lost(self, n: int) -> None:
        self.lease_lost += n

    def on_rescued(self, n: int) -> None:
        self.lease_rescues += n

    def on_claims_paused(self, waited: float | None) -> None:
        """The claim loop has waited ``waited`` seconds for the outcome writer (a stall);
        None: it claims again."""
        if waited is None:
            self.claims_paused_since = None
        elif self.claims_paused_since is None:
            self.claim_pauses += 1
            self.claims_paused_since = self.clock() - waited

    def on_retention(
        self, sent: int, dead: int, oldest_sent: float | None, oldest_dead: float | None
    ) -> None:
        self.retention_deleted["sent"] += sent
        self.retention_deleted["dead"] += dead
        self.retention_last_run = self.wall()
        self.retention_oldest = {"sent": oldest_sent, "dead": oldest_dead}

    def on_retention_skipped(self) -> None:
        self.retention_skipped += 1

    def on_db_error(self, operation: str) -> None:
        """A query that failed because the database was unavailable (then retried)."""
        self.db_errors[operation] += 1

    def on_notification(self) -> None:
        self.notifications += 1
        self.last_notification = self.clock()

    def on_listener(self, connected: bool) -> None:
        if connected and self._listener_ever_connected:
            self.listener_reconnects += 1
        self._listener_ever_connected |= connected
        self.listener_connected = connected

    def on_idle(self, declared: bool) -> None:
        self.idle_declared = declared

    def on_poll(self) -> None:
        self.polls += 1
        self.last_poll = self.clock()

    def on_db_health(self, health: DbHealth) -> None:
        self.db = health
        self.db_read_at = self.clock()
        self.db_error = None

    def on_db_health_failed(self, reason: str) -> None:
        self.db_errors["health"] += 1
        self.db_error = redact(reason)

    # Called from the loop watchdog's thread: plain assignments of immutable values, so the
    # loop reads the old or the new state, never half of one.
    def on_loop_stalled(self, stall: LoopStall) -> None:
        self.loop_stalls += 1
        self.loop_stall = stall

    def on_loop_turned(self, stall: LoopStall) -> None:
        assert stall.ended is not None
        self.loop_blocked_seconds += stall.ended - stall.since
        self.loop_stall = stall

    def _error(self, intent: Intent, reason: str, outcome: str) -> None:
        self.errors.append(ErrorEntry(self.wall(), intent.kind, intent.id, redact(reason), outcome))

    # --- reading -------------------------------------------------------------------------

    def snapshot(self, *, listen: bool = True, stopping: bool = False) -> Snapshot:
        now = self.clock()
        current = math.floor(now)
        # Complete seconds since start: the current one is still filling up.
        complete = max(0, current - math.ceil(self.started_at))
        last_minute = list(self.seconds.between(current - WINDOW, current - 1))
        per_second = tuple(b.sent if b else 0 for b in last_minute)
        recent = per_second[-RATE_NOW_SPAN:]
        now_span = min(RATE_NOW_SPAN, complete)
        minute_span = min(WINDOW, complete)

        histogram: Counter[int] = Counter()
        largest = 0.0
        retried_minute = dead_minute = 0
        for bucket in self.seconds.between(current - WINDOW + 1, current):
            if bucket is None:
                continue
            histogram.update(bucket.latency)
            largest = max(largest, bucket.latency_max)
            retried_minute += bucket.retried
            dead_minute += bucket.dead
        p50, p95, p99 = percentiles(histogram, largest, (0.50, 0.95, 0.99)) or (None,) * 3

        kinds = sorted(set(self.sent) | set(self.retried) | set(self.dead))
        return Snapshot(
            taken_at=self.wall(),
            uptime=now - self.started_at,
            concurrency=self.concurrency,
            listen=listen,
            stopping=stopping,
            sent=sum(self.sent.values()),
            retried=sum(self.retried.values()),
            dead=sum(self.dead.values()),
            claimed=self.claimed,
            released=sum(self.released.values()),
            lease_lost=self.lease_lost,
            rate_now=sum(recent[len(recent) - now_span :]) / now_span if now_span else 0.0,
            rate_minute=sum(per_second[WINDOW - minute_span :]) / minute_span
            if minute_span
            else 0.0,
            per_second=per_second,
            retried_minute=retried_minute,
            dead_minute=dead_minute,
            latency=Latency(sum(histogram.values()), p50, p95, p99),
            slots=tuple(
                SlotView(i, s.intent_id, s.kind, now - s.since) if s else None
                for i, s in enumerate(self.slots)
            ),
            kinds=tuple(KindCounts(k, self.sent[k], self.retried[k], self.dead[k]) for k in kinds),
            errors=tuple(reversed(self.errors)),
            listener_connected=self.listener_connected,
            listener_reconnects=self.listener_reconnects,
            notifications=self.notifications,
            since_notification=_since(now, self.last_notification),
            since_poll=_since(now, self.last_poll),
            idle_declared=self.idle_declared,
            db=self.db,
            db_age=_since(now, self.db_read_at),
            db_error=self.db_error,
            loop_stalls=self.loop_stalls,
            loop_blocked_seconds=self.loop_blocked_seconds,
            loop_stall=stall_view(now, self.loop_stall),
            outcomes_unrecorded=self.outcomes_unrecorded,
            claims_paused=_since(now, self.claims_paused_since),
            claim_pauses=self.claim_pauses,
            retention=RetentionView(
                sum(self.retention_deleted.values()),
                None
                if self.retention_last_run is None
                else max(0.0, self.wall() - self.retention_last_run),
                self.retention_skipped,
            )
            if self.retention_enabled
            else None,
        )


def _since(now: float, then: float | None) -> float | None:
    return None if then is None else max(0.0, now - then)
