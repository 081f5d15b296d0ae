"""The least privileges of the two roles that use the schema (`outbox-worker grants`).

The worker's: what ``run``, ``status``, ``retry-dead``, ``skip-dead`` and ``purge`` do, each
found by running it as a role with nothing else (tests/test_roles.py). The producer's: the
``enqueue`` function, which runs with its owner's rights (SECURITY DEFINER, search_path
pinned: schema.sql), or a plain INSERT of the producer columns. Never UPDATE or DELETE, and
INSERT on those columns only, so a producer cannot write ``status = 'sent'`` or a lease.
The schema's owner (whoever runs ``migrate``) needs none of this.
"""

from __future__ import annotations

from worker.store.sqlfiles import quote_ident

# What a producer may set; the rest (status, attempts, the lease, ...) is the worker's.
PRODUCER_COLUMNS = (
    "kind",
    "payload",
    "run_at",
    "dedupe_key",
    "max_attempts",
    "ordering_key",
    "trace_context",
)
ENQUEUE_SIGNATURE = "enqueue(text, jsonb, timestamptz, text, integer, text, jsonb)"


def worker_grants(schema: str, role: str) -> list[str]:
    s, r = quote_ident(schema), quote_ident(role)
    return [
        f"GRANT USAGE ON SCHEMA {s} TO {r};",
        # claim, outcomes, heartbeats, rescue, retry-dead, skip-dead (UPDATE); purge (DELETE)
        f"GRANT SELECT, UPDATE, DELETE ON {s}.intent TO {r};",
        # the idle flag that tells producers to notify (declare_idle, declare_busy, the sweep)
        f"GRANT SELECT, INSERT, DELETE ON {s}.idle_worker TO {r};",
        # status and the dashboard's halted ordering keys
        f"GRANT SELECT ON {s}.halted_key TO {r};",
    ]


def producer_grants(schema: str, role: str) -> list[str]:
    s, r = quote_ident(schema), quote_ident(role)
    return [
        f"GRANT USAGE ON SCHEMA {s} TO {r};",
        f"GRANT EXECUTE ON FUNCTION {s}.{ENQUEUE_SIGNATURE} TO {r};",
        # Only for a plain INSERT instead of enqueue(): the producer columns, and the idle
        # flag the insert trigger reads (it runs with the inserter's rights).
        f"GRANT INSERT ({', '.join(PRODUCER_COLUMNS)}) ON {s}.intent TO {r};",
        f"GRANT SELECT ON {s}.idle_worker TO {r};",
    ]


def grants_sql(schema: str, worker_role: str, producer_role: str) -> str:
    w, p = quote_ident(worker_role), quote_ident(producer_role)
    return "\n".join(
        [
            f"-- The worker ({w}): run, status, retry-dead, skip-dead, purge.",
            *worker_grants(schema, worker_role),
            "-- Optional: the dashboard's oldest-transaction figure sees other roles' sessions.",
            f"-- GRANT pg_read_all_stats TO {w};",
            f"-- Producers ({p}): enqueue(), or a plain INSERT of the producer columns.",
            *producer_grants(schema, producer_role),
        ]
    )
