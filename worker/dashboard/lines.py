"""The dashboard's words: the header's verdict and the overview's lines, each a pure function
of a ``Snapshot``, coloured by the thresholds in ``worker.observe.findings``."""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text

from worker.dashboard.widgets import Parts
from worker.observe.findings import (
    BAD,
    BEHIND,
    DB_STALE,
    DEAD_TUPLES,
    DEAD_TUPLES_MIN,
    HORIZON_XIDS,
    NOTIFY_QUEUE,
    OK,
    OLD_XACT,
    WARN,
    Finding,
    level,
)
from worker.observe.stats import Snapshot
from worker.store.grants import NO_PRIVILEGE
from worker.store.rows import DbHealth
from worker.units import fmt_bytes, fmt_count, fmt_duration, fmt_latency, fmt_rate

# --- the verdict ---------------------------------------------------------------------------


def verdict(snap: Snapshot, findings: Sequence[Finding], width: int = 40) -> Text:
    """The header's answer: ``STOPPING`` once a stop was asked for; else each finding in its
    colour, worst first, as many as fit (``+N`` for the rest); with none, ``keeping up``
    while anything is in flight or was sent in the last seconds, ``idle`` otherwise."""
    if snap.stopping:
        return Text(" STOPPING ", style="bold black on yellow")
    if not findings:
        busy = snap.busy_slots or snap.rate_now > 0
        return Text(" keeping up " if busy else " idle ", style="bold black on green")
    text = Text()
    for shown, finding in enumerate(findings):
        badge = Text(f" {finding.text} ", style=f"bold black on {finding.level}")
        rest = len(findings) - shown - 1
        more = len(f" +{rest}") if rest else 0
        if shown and text.cell_len + 1 + badge.cell_len + more > width:
            text.append(f" +{len(findings) - shown}", style="bold")
            break
        if shown:
            text.append(" ")
        text.append_text(badge)
    return text


# --- the overview lines ------------------------------------------------------------------------


def _styled(text: str, lvl: str) -> Text:
    return Text(text, style="" if lvl == OK else f"bold {lvl}")


def throughput_line(snap: Snapshot) -> Parts:
    # First when it happens: it is why nothing is sent (the outcome writer is stuck).
    paused = (
        _styled(
            f"claims paused {fmt_duration(snap.claims_paused)}: "
            f"{snap.outcomes_unrecorded:,} outcomes unrecorded",
            BAD,
        )
        if snap.claims_paused is not None
        else ""
    )
    return Parts(
        [
            paused,
            Text.assemble((fmt_rate(snap.rate_now), "bold"), " now"),
            f"{fmt_rate(snap.rate_minute)} last min",
            f"peak {max(snap.per_second, default=0):,}/s",
            f"{snap.sent:,} sent",
            f"{snap.claimed:,} claimed",
            f"{snap.released:,} released" if snap.released else "",
            _styled(f"{snap.lease_lost:,} leases lost", WARN) if snap.lease_lost else "",
        ]
    )


def latency_line(snap: Snapshot) -> Parts:
    lat = snap.latency
    if lat.count == 0:
        return Parts([Text("nothing sent in the last 60s", style="dim")])
    return Parts(
        [
            f"p50 {fmt_latency(lat.p50)}",
            Text.assemble("p95 ", (fmt_latency(lat.p95), "bold")),
            f"p99 {fmt_latency(lat.p99)}",
            Text(f"commit→sent, {lat.count:,} in 60s", style="dim"),
        ]
    )


def queue_line(snap: Snapshot) -> Parts:
    db = snap.db
    if db is None:
        if snap.db_error:
            # A refused read answered: a grant is missing, the database is there.
            refused = snap.db_error.startswith(NO_PRIVILEGE)
            text = snap.db_error if refused else f"unavailable: {snap.db_error}"
            return Parts([_styled(text, BAD)])
        return Parts([Text("waiting for the first database read", style="dim")])
    # The table's own status words, so that each number is a WHERE status = '...' away.
    cap = db.count_cap
    behind = level(db.oldest_due_seconds, BEHIND)
    oldest = (
        "none waiting"
        if db.oldest_due_seconds is None
        else f"oldest waiting {fmt_duration(db.oldest_due_seconds)}"
    )
    pending = f"{db.pending:,}{'+' if db.pending_capped else ''}"
    return Parts(
        [
            Text.assemble("pending ", (pending, "bold")),
            _styled(oldest, behind),
            f"processing {fmt_count(db.processing, cap)}",
            _styled(f"dead {fmt_count(db.dead, cap)}", WARN if db.dead else OK),
            *(
                [
                    _styled(
                        f"keys halted {fmt_count(db.halted_keys, db.count_cap)} "
                        f"(oldest {db.oldest_halted_key!r}, "
                        f"{fmt_duration(db.oldest_halted_seconds)})",
                        BAD,
                    )
                ]
                if db.halted_keys
                else []
            ),
            Text(
                f"pending: {fmt_count(db.pending_due, cap)} due, "
                f"{fmt_count(db.pending_later, cap)} run_at later, "
                f"{fmt_count(db.pending_held, cap)} held",
                style="dim",
            )
            if db.pending
            else "",
        ]
    )


def wakeup_line(snap: Snapshot) -> Parts:
    db = snap.db
    if not snap.listen:
        head = Text("polling only (--no-listen)", style="bold")
    elif snap.listener_connected:
        head = Text.assemble(("LISTEN ok", f"bold {OK}"), " ", _sleep_state(snap))
    else:
        head = _styled("LISTEN down: polling until it is back", BAD)
    usage = db.notify_queue_usage if db else None
    return Parts(
        [
            head,
            f"notify {fmt_duration(snap.since_notification)} ago"
            if snap.since_notification is not None
            else "no notify yet",
            _styled(
                f"{snap.listener_reconnects} reconnects",
                WARN if snap.listener_reconnects else OK,
            ),
            f"poll {fmt_duration(snap.since_poll)} ago"
            if snap.since_poll is not None
            else "no idle poll yet",
            _styled(f"queue {usage:.1%}", level(usage, NOTIFY_QUEUE)) if usage is not None else "",
            (f"{db.idle_workers} idle worker" + ("" if db.idle_workers == 1 else "s"))
            if db
            else "",
        ]
    )


def _sleep_state(snap: Snapshot) -> Text:
    # idle_declared: producers notify on our behalf; otherwise we are claiming on our own
    return Text("(asleep)" if snap.idle_declared else "(busy)", style="dim")


def horizon_holder(db: DbHealth) -> str:
    """Who holds back vacuum, in words: "xact by pid 42 (psql, idle in transaction)",
    "replication slot s1 (inactive)", "prepared xact gid" ("" when nothing does)."""
    if db.horizon_kind == "replication slot":
        return f"replication slot {db.oldest_xact_application} ({db.horizon_state})"
    if db.horizon_kind == "prepared transaction":
        return f"prepared xact {db.oldest_xact_application}"
    if not db.oldest_xact_pid:
        return ""
    about = ", ".join(x for x in (db.oldest_xact_application, db.horizon_state) if x)
    return f"xact by pid {db.oldest_xact_pid}" + (f" ({about})" if about else "")


def database_line(snap: Snapshot) -> Parts:
    db = snap.db
    if db is None:
        return Parts([Text("-", style="dim")])
    parts: list[Text | str] = []
    holder = horizon_holder(db)
    xact = level(db.oldest_xact_seconds, OLD_XACT)
    if db.horizon_kind == "replication slot":
        behind = level(db.horizon_xids, HORIZON_XIDS)
        parts.append(_styled(f"{holder}, {db.horizon_xids or 0:,} xids behind", behind))
        holder = ""
    elif db.oldest_xact_seconds is None:
        parts.append("no open xact")
    else:
        age = f"oldest xact {fmt_duration(db.oldest_xact_seconds)}"
        # who holds it matters once it is old: then it goes first, with the age
        parts.append(_styled(f"{age}, {holder}" if xact != OK and holder else age, xact))
    if db.dead_tuples is not None:
        total = db.dead_tuples + (db.live_tuples or 0)
        share = db.dead_tuples / total if total else 0.0
        bloat = level(share, DEAD_TUPLES) if db.dead_tuples >= DEAD_TUPLES_MIN else OK
        parts.append(_styled(f"dead tuples {db.dead_tuples:,} ({share:.0%})", bloat))
    parts.append(
        "never vacuumed"
        if db.last_autovacuum_seconds is None
        else f"vacuumed {fmt_duration(db.last_autovacuum_seconds)} ago"
    )
    if db.table_bytes is not None:
        indexes = f" + indexes {fmt_bytes(db.index_bytes)}" if db.index_bytes is not None else ""
        parts.append(f"table {fmt_bytes(db.table_bytes)}{indexes}")
    if db.server:
        parts.append(f"on {db.server}")
    if holder and xact == OK:
        parts.append(holder)
    if snap.retention is not None:
        ran = snap.retention.since_run
        parts.append(
            f"retention {snap.retention.deleted:,} deleted, "
            + ("not run yet" if ran is None else f"ran {fmt_duration(ran)} ago")
            + (
                f", {snap.retention.skipped:,} rounds left to another worker"
                if snap.retention.skipped
                else ""
            )
        )
    if snap.db_age is not None:
        stale = level(snap.db_age, (DB_STALE, DB_STALE * 6))
        parts.append(_styled(f"read {fmt_duration(snap.db_age)} ago", stale))
    return Parts(parts)
