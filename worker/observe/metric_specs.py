"""Every metric /metrics can show, declared once: name, type, labels, help, and when it is
left out. The collector (worker/observe/metrics.py) builds its families from these and only
these, and the reference page (docs/reference/metrics.md) is generated from them, so a metric
cannot be added without its line in the documentation. Plain data: no prometheus-client."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from worker.observe.health import COUNT_CAP

MetricType = Literal["counter", "gauge", "histogram", "info"]


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str  # as exposed: counters end in _total, the info metric in _info
    type: MetricType
    help: str
    labels: tuple[str, ...] = ()
    absent: str = ""  # when the collector leaves it out ("with --no-listen"); "": never

    @property
    def text(self) -> str:
        """The HELP line, and the page's description."""
        return f"{self.help} Absent {self.absent}." if self.absent else self.help


_QUEUE = "when the queue query did not answer (outbox_database_up is 0)"
_NOT_VACUUMED = "until statistics exist"
_NOTHING_HOLDS = "when nothing holds the horizon back"
_RETENTION_OFF = "when both --retain-sent and --retain-dead are forever"

_SPECS = (
    MetricSpec("outbox_build_info", "info",
               "Always 1: the version of this worker and the schema of its intent table.",
               ("version", "schema")),
    MetricSpec("outbox_intents_sent_total", "counter",
               "Intents delivered and recorded as sent.", ("kind",)),
    MetricSpec("outbox_intents_retried_total", "counter",
               "Failed delivery attempts scheduled to run again.", ("kind",)),
    MetricSpec("outbox_intents_dead_total", "counter",
               "Intents recorded as dead (permanent failure, attempts exhausted, unknown kind).",
               ("kind",)),
    MetricSpec("outbox_intents_released_total", "counter",
               "Intents handed back to pending undelivered (shutdown, kind at its --limits).",
               ("kind",)),
    MetricSpec("outbox_delivery_duration_seconds", "histogram",
               "Time one delivery took in its sink (a batch sink's call counts for each "
               "intent).", ("kind",)),
    MetricSpec("outbox_commit_to_sent_seconds", "histogram",
               "From the intent's commit (created_at) to its sent outcome being recorded.",
               ("kind",)),
    MetricSpec("outbox_claims_total", "counter", "Claim statements that returned rows."),
    MetricSpec("outbox_intents_claimed_total", "counter", "Rows claimed for delivery."),
    MetricSpec("outbox_notifications_received_total", "counter", "NOTIFY wake-ups received."),
    MetricSpec("outbox_polls_total", "counter",
               "Fallback polls (a wait that no notification ended)."),
    MetricSpec("outbox_listener_reconnects_total", "counter",
               "LISTEN connections re-established."),
    MetricSpec("outbox_lease_rescues_total", "counter",
               "Expired leases (of any worker) this worker returned to pending."),
    MetricSpec("outbox_claim_pauses_total", "counter",
               "Times claims paused while the outcome writer was stuck."),
    MetricSpec("outbox_leases_lost_total", "counter",
               "Outcomes discarded because another worker had taken the row over."),
    MetricSpec("outbox_event_loop_stalls_total", "counter",
               "Times the event loop did not turn for over --loop-block-warning (a handler "
               "blocking it)."),
    MetricSpec("outbox_event_loop_blocked_seconds_total", "counter",
               "Total length of those stalls, counted when each ends."),
    MetricSpec("outbox_database_errors_total", "counter",
               "Queries that failed because the database was unavailable, by operation (claim, "
               "record, heartbeat, health, retention); each is retried.", ("operation",)),
    MetricSpec("outbox_listener_connected", "gauge",
               "1 while the LISTEN connection is up; 0 while the worker only polls.",
               absent="with --no-listen"),
    MetricSpec("outbox_delivery_slots", "gauge", "Delivery slots (--concurrency)."),
    MetricSpec("outbox_delivery_slots_busy", "gauge", "Delivery slots delivering an intent now."),
    MetricSpec("outbox_outcomes_unrecorded", "gauge",
               "Outcomes delivered and waiting for the outcome writer to record them."),
    MetricSpec("outbox_claims_paused", "gauge",
               "1 while claims wait for a stuck outcome writer (over 1 s at the bound on rows "
               "held)."),
    MetricSpec("outbox_database_up", "gauge",
               "1 if the queue health query answered at this scrape."),
    MetricSpec("outbox_queue_intents", "gauge",
               "Intents in the table by state (due, scheduled, processing, dead); each count "
               f"stops at {COUNT_CAP} (outbox_queue_count_cap): that value means at least.",
               ("state",), _QUEUE),
    MetricSpec("outbox_queue_count_cap", "gauge",
               "Where the outbox_queue_* counts stop: a count equal to it means at least.",
               absent=_QUEUE),
    MetricSpec("outbox_queue_oldest_due_age_seconds", "gauge",
               "How long the longest-waiting due intent has been due (0: nothing due).",
               absent=_QUEUE),
    MetricSpec("outbox_queue_halted_keys", "gauge",
               f"Ordering keys halted by a dead intent (stops at {COUNT_CAP}).", absent=_QUEUE),
    MetricSpec("outbox_notify_queue_usage_ratio", "gauge",
               "pg_notification_queue_usage(): how full the server's NOTIFY queue is, 0 to 1.",
               absent=_QUEUE),
    MetricSpec("outbox_table_bytes", "gauge", "Size of the intent table (pg_table_size).",
               absent=_NOT_VACUUMED),
    MetricSpec("outbox_table_dead_tuples", "gauge",
               "Dead tuples in the intent table, waiting for VACUUM.", absent=_NOT_VACUUMED),
    MetricSpec("outbox_table_index_bytes", "gauge", "Size of the intent table's indexes.",
               absent=_NOT_VACUUMED),
    MetricSpec("outbox_table_last_vacuum_age_seconds", "gauge",
               "Since the intent table was last vacuumed (by autovacuum or by hand).",
               absent="if it never was"),
    MetricSpec("outbox_oldest_transaction_age_seconds", "gauge",
               "Age of what holds back vacuum (outbox_xmin_horizon_holder): the oldest open "
               "or prepared transaction.", absent=f"{_NOTHING_HOLDS}, or a replication slot does"),
    MetricSpec("outbox_xmin_horizon_age_xids", "gauge",
               "How far back the xmin horizon is held, in transaction ids.",
               absent=_NOTHING_HOLDS),
    MetricSpec("outbox_xmin_horizon_holder", "gauge",
               "Always 1: what holds back vacuum of the intent table (a transaction, a "
               "replication slot or a prepared transaction), its pid, its application name, "
               "slot name or gid, and its state (idle in transaction, inactive).",
               ("kind", "pid", "name", "state"), _NOTHING_HOLDS),
    MetricSpec("outbox_retention_deleted_total", "counter",
               "Finished intents this worker's retention deleted, by status (sent, dead).",
               ("status",), _RETENTION_OFF),
    MetricSpec("outbox_retention_skipped_total", "counter",
               "Retention rounds skipped because another worker was deleting.",
               absent=_RETENTION_OFF),
    MetricSpec("outbox_retention_last_run_timestamp_seconds", "gauge",
               "When this worker's retention last completed a round (Unix time).",
               absent=f"before its first round, and {_RETENTION_OFF}"),
    MetricSpec("outbox_retention_oldest_kept_age_seconds", "gauge",
               "Age of the oldest sent intent kept (since sent; the lowest id) and dead one "
               "(since created), at this worker's last retention round.", ("status",),
               f"for a status with no row, and {_RETENTION_OFF}"),
)  # fmt: skip

METRICS: dict[str, MetricSpec] = {spec.name: spec for spec in _SPECS}
