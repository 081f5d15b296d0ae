"""Without a terminal: the dashboard's key numbers as one log line now and then.

Plain text or JSON like every other line (``--log-format``); written only when something
happened, so an idle worker does not fill its log.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import anyio

from worker.observe.findings import assess
from worker.observe.health import HealthMonitor
from worker.observe.stats import Snapshot
from worker.relay.core import Relay
from worker.units import fmt_duration, fmt_latency

log = logging.getLogger("outbox.stats")

INTERVAL = 30.0


def summary_line(snap: Snapshot) -> str:
    lat = snap.latency
    parts = [
        f"sent {snap.rate_minute:.1f}/s over the last minute ({snap.sent} in this run)",
        f"retries {snap.retried_minute}/min, dead {snap.dead_minute}/min",
        f"busy slots {snap.busy_slots}/{snap.concurrency}",
    ]
    if lat.count:
        parts.append(
            f"commit to sent p50 {fmt_latency(lat.p50)} p95 {fmt_latency(lat.p95)} "
            f"p99 {fmt_latency(lat.p99)}"
        )
    db = snap.db
    if db is not None:
        cap = "+" if db.pending_capped else ""
        oldest = (
            f", oldest waiting {fmt_duration(db.oldest_due_seconds)}"
            if db.oldest_due_seconds is not None
            else ""
        )
        parts.append(
            f"pending {db.pending}{cap} ({db.pending_due} due){oldest}, "
            f"processing {db.processing}, dead {db.dead}"
        )
    if snap.listen:
        parts.append("LISTEN ok" if snap.listener_connected else "LISTEN down, polling")
    problems = assess(snap)
    if problems:
        parts.append("attention: " + ", ".join(p.text for p in problems))
    return "; ".join(parts)


def _activity(snap: Snapshot) -> tuple[int, int, int, int]:
    due = snap.db.pending_due if snap.db else 0
    return snap.claimed, snap.sent + snap.retried + snap.dead, due, snap.listener_reconnects


async def log_summaries(
    relay: Relay, health: HealthMonitor | None = None, interval: float = INTERVAL
) -> None:
    """One summary line every ``interval`` seconds in which anything changed; until cancelled.
    The database numbers are read just before each line (one query per interval)."""
    last: tuple[int, int, int, int] | None = None
    while True:
        await anyio.sleep(interval)
        snap = relay.stats.snapshot(listen=relay.settings.listen, stopping=relay.stopping)
        if health is not None:
            # The counters first, the database after: a row the counters call sent is never
            # still "processing" in the numbers beside them.
            await health.refresh()
            fresh = relay.stats.snapshot(listen=relay.settings.listen, stopping=relay.stopping)
            snap = replace(snap, db=fresh.db, db_age=fresh.db_age)
        now = _activity(snap)
        if now != last or now[2]:  # something moved, or work is waiting
            log.info("%s", summary_line(snap))
        last = now
