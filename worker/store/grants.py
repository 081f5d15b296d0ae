"""The least privileges of the two roles that use the schema (`outbox-worker grants`), and
the one-line error for a role that lacks one.

The worker's: what ``run``, ``status``, ``retry-dead``, ``skip-dead`` and ``purge`` do, each
found by running it as a role with nothing else (tests/test_roles.py). The producer's: the
``enqueue`` function, which runs with its owner's rights (SECURITY DEFINER, search_path
pinned: schema.sql), or a plain INSERT of the producer columns. Never UPDATE or DELETE, and
INSERT on those columns only, so a producer cannot write ``status = 'sent'`` or a lease.
The schema's owner (whoever runs ``migrate``) needs none of this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
ENQUEUE_ARGS = "text, jsonb, timestamptz, text, integer, text, jsonb"
# How a health read that lacked a privilege starts: the dashboard and the summary line say
# so, rather than "database unreachable".
NO_PRIVILEGE = "missing privilege"


@dataclass(frozen=True, slots=True)
class Privilege:
    privilege: str  # as GRANT spells it
    kind: str  # "schema", "table" (views too), "function"
    name: str  # the object in the schema; "" for the schema itself

    def on(self, schema: str) -> str:
        s = quote_ident(schema)
        if self.kind == "schema":
            return f"SCHEMA {s}"
        if self.kind == "function":
            return f"FUNCTION {s}.{self.name}({ENQUEUE_ARGS})"
        return f"{s}.{self.name}"


WORKER = (
    Privilege("USAGE", "schema", ""),
    # claim, outcomes, heartbeats, rescue, retry-dead, skip-dead (UPDATE); purge (DELETE)
    Privilege("SELECT", "table", "intent"),
    Privilege("UPDATE", "table", "intent"),
    Privilege("DELETE", "table", "intent"),
    # the idle flag that tells producers to notify (declare_idle, declare_busy, the sweep)
    Privilege("SELECT", "table", "idle_worker"),
    Privilege("INSERT", "table", "idle_worker"),
    Privilege("DELETE", "table", "idle_worker"),
    # status and the dashboard's halted ordering keys
    Privilege("SELECT", "table", "halted_key"),
    # the start-up check that the schema is as new as the worker
    Privilege("SELECT", "table", "schema_version"),
)
PRODUCER = (
    Privilege("USAGE", "schema", ""),
    Privilege("EXECUTE", "function", "enqueue"),
    Privilege("SELECT", "table", "schema_version"),  # `outbox-worker enqueue`'s schema check
)


def _grant_lines(schema: str, role: str, privileges: tuple[Privilege, ...]) -> list[str]:
    """One GRANT per object, its privileges in the order listed."""
    by_object: dict[str, list[str]] = {}
    for p in privileges:
        by_object.setdefault(p.on(schema), []).append(p.privilege)
    return [
        f"GRANT {', '.join(ps)} ON {on} TO {quote_ident(role)};" for on, ps in by_object.items()
    ]


def grants_sql(schema: str, worker_role: str | None, producer_role: str | None) -> str:
    lines = []
    if worker_role is not None:
        w = quote_ident(worker_role)
        lines += [
            f"-- The worker ({w}): run, status, retry-dead, skip-dead, purge.",
            *_grant_lines(schema, worker_role, WORKER),
            "-- Optional: the dashboard's oldest-transaction figure sees other roles' sessions.",
            f"-- GRANT pg_read_all_stats TO {w};",
        ]
    if producer_role is not None:
        p, s = quote_ident(producer_role), quote_ident(schema)
        lines += [
            f"-- Producers ({p}): enqueue(), or a plain INSERT of the producer columns.",
            *_grant_lines(schema, producer_role, PRODUCER),
            # Only for a plain INSERT instead of enqueue(): the producer columns, and the idle
            # flag the insert trigger reads (it runs with the inserter's rights).
            f"GRANT INSERT ({', '.join(PRODUCER_COLUMNS)}) ON {s}.intent TO {p};",
            f"GRANT SELECT ON {s}.idle_worker TO {p};",
        ]
    return "\n".join(lines)


# Which of the listed privileges the connected role lacks. By oid, from the catalog: a
# lookup by name would itself fail without USAGE on the schema. An object that does not
# exist is not a privilege problem (the schema check reports it).
_MISSING = """
SELECT r.i FROM unnest($2::text[], $3::text[], $4::text[]) WITH ORDINALITY AS r(priv, kind, obj, i)
WHERE NOT coalesce(CASE r.kind
    WHEN 'schema' THEN (SELECT has_schema_privilege(n.oid, r.priv)
                        FROM pg_catalog.pg_namespace n WHERE n.nspname = $1)
    WHEN 'function' THEN (SELECT bool_and(has_function_privilege(f.oid, r.priv))
                          FROM pg_catalog.pg_proc f
                          JOIN pg_catalog.pg_namespace n ON n.oid = f.pronamespace
                          WHERE n.nspname = $1 AND f.proname = r.obj)
    ELSE (SELECT has_table_privilege(c.oid, r.priv)
          FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = $1 AND c.relname = r.obj) END, true)
ORDER BY r.i
"""


async def missing(conn: Any, schema: str, needed: tuple[Privilege, ...]) -> list[Privilege]:
    rows = await conn.fetch(
        _MISSING,
        schema,
        [p.privilege for p in needed],
        [p.kind for p in needed],
        [p.name for p in needed],
    )
    return [needed[r["i"] - 1] for r in rows]


async def privilege_error(
    conn: Any, schema: str, needed: tuple[Privilege, ...], what: str = ""
) -> str | None:
    """One line naming what the connected role lacks and the fix; None when it lacks
    nothing of ``needed``. ``what``: the server's own message, if a statement failed."""
    lacking = await missing(conn, schema, needed)
    if not lacking and not what:
        return None
    role = await conn.fetchval("SELECT current_user")
    named = ", ".join(f"{p.privilege} on {p.on(schema)}" for p in lacking)
    head = f"{what}: " if what else ""
    lacks = f"role {quote_ident(role)} lacks {named}" if named else f"role {quote_ident(role)}"
    who = "--producer-role" if needed is PRODUCER else "--worker-role"
    return f"{head}{lacks}: {grants_hint(schema, who, role)}"


def grants_hint(schema: str, flag: str = "--worker-role", role: str = "ROLE") -> str:
    return (
        f"as the schema's owner, apply what `outbox-worker grants {flag} {role} "
        f"--schema {schema}` prints"
    )
