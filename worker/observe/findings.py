"""What in a snapshot needs an operator's attention (its numbers told in worker/units.py).

Pure functions of a ``Snapshot``, shared by the dashboard (colours, the header's verdict)
and the summary log line, so both judge by the same thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass

from worker.observe.stats import Snapshot
from worker.store.grants import NO_PRIVILEGE
from worker.units import fmt_count, fmt_duration

# Thresholds: (warn, bad). Chosen for an email relay: deliveries take well under a second,
# the default poll is 2 s, so an intent due for 5 s means the relay is not keeping up.
BEHIND = (5.0, 60.0)  # oldest due intent waiting, seconds
SLOT_BUSY = (10.0, 60.0)  # one delivery running this long looks stuck
OLD_XACT = (60.0, 600.0)  # an open transaction this old makes the queue table bloat
# A replication slot holding the horizon has no age in seconds: transaction ids behind it.
HORIZON_XIDS = (1_000_000, 100_000_000)
NOTIFY_QUEUE = (0.1, 0.5)  # pg_notification_queue_usage(): at 1.0 NOTIFY fails
# Dead share of the intent table's tuples. Autovacuum starts at ~20% by default, so only
# well past that is it falling behind; below DEAD_TUPLES_MIN nothing matters yet.
DEAD_TUPLES = (0.5, 0.9)
DEAD_TUPLES_MIN = 10_000
DB_STALE = 5.0  # the last health read is this old: the numbers are not current
# A blocked event loop (worker/observe/loopwatch.py) stays in the verdict this long after it turned
# again: red for the first bound, yellow until the second. The dashboard could not draw
# while it lasted, so this is how an operator learns of it.
LOOP_STALL_SHOWN = (60.0, 600.0)

OK, WARN, BAD = "green", "yellow", "red"
LEVEL_RANK = {OK: 0, WARN: 1, BAD: 2}


def level(value: float | None, bounds: tuple[float, float]) -> str:
    if value is None or value < bounds[0]:
        return OK
    return WARN if value < bounds[1] else BAD


# --- findings -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Finding:
    level: str
    text: str


def assess(snap: Snapshot) -> list[Finding]:
    """What is wrong, worst first; empty when all is well."""
    found: list[Finding] = []
    db = snap.db
    if snap.db_error is not None and snap.db_error.startswith(NO_PRIVILEGE):
        found.append(Finding(BAD, "database: missing privilege (outbox-worker grants)"))
    elif snap.db_error is not None:
        found.append(Finding(BAD, "database unreachable"))
    elif db is not None and snap.db_age is not None and snap.db_age > DB_STALE:
        found.append(Finding(WARN, f"db numbers {fmt_duration(snap.db_age)} old"))
    if db is not None:
        behind = level(db.oldest_due_seconds, BEHIND)
        if behind != OK:
            waited = fmt_duration(db.oldest_due_seconds)
            found.append(Finding(behind, f"behind: pending {waited}"))
    if snap.dead_minute:
        found.append(Finding(BAD, f"{snap.dead_minute:,} dead/min"))
    if db is not None and db.halted_keys:
        found.append(Finding(BAD, f"{fmt_count(db.halted_keys, db.count_cap)} keys halted"))
    if snap.claims_paused is not None:  # the outcome writer is stuck: nothing moves
        found.append(Finding(BAD, f"claims paused {fmt_duration(snap.claims_paused)}"))
    if snap.listen and not snap.listener_connected:
        found.append(Finding(WARN, "LISTEN down, polling"))
    busy = [s for s in snap.slots if s is not None]
    if busy:
        longest = max(busy, key=lambda s: s.seconds)
        stuck = level(longest.seconds, SLOT_BUSY)
        if stuck != OK:
            found.append(Finding(stuck, f"slot {longest.index} {fmt_duration(longest.seconds)}"))
    stall = snap.loop_stall
    if stall is not None and (stall.ago or 0.0) < LOOP_STALL_SHOWN[1]:
        seen = BAD if (stall.ago or 0.0) < LOOP_STALL_SHOWN[0] else WARN
        text = f"loop blocked {fmt_duration(stall.seconds)} by {stall.culprit}"
        found.append(Finding(seen, text))
    if snap.retried_minute:
        found.append(Finding(WARN, f"{snap.retried_minute:,} retries/min"))
    if db is not None:
        xact = level(db.oldest_xact_seconds, OLD_XACT)
        if xact != OK:
            found.append(Finding(xact, f"old xact {fmt_duration(db.oldest_xact_seconds)}"))
        elif db.horizon_kind == "replication slot":
            behind = level(db.horizon_xids, HORIZON_XIDS)
            if behind != OK:
                found.append(Finding(behind, f"slot {db.oldest_xact_application} holds xmin"))
        usage = level(db.notify_queue_usage, NOTIFY_QUEUE)
        if usage != OK:
            found.append(Finding(usage, f"notify queue {db.notify_queue_usage:.0%}"))
    found.sort(key=lambda f: -LEVEL_RANK[f.level])
    return found
