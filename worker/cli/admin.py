"""Operator commands: status, retry-dead, skip-dead, purge, enqueue."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg
from rich.console import Console
from rich.table import Table

from worker.producer import enqueue as producer_enqueue
from worker.store.queries import Store
from worker.store.sqlfiles import Names

# Above this many rows (the planner's estimate) status counts sent intents no more: that
# was a scan of the table (0.7-1.0 s on 2 M rows); it estimates them instead.
EXACT_BELOW = 200_000


async def status(conn: asyncpg.Connection, names: Names) -> dict[str, Any]:
    store = Store(names)
    rows = await store.table_rows_estimate(conn)
    sent_estimate: int | None = None
    if rows < EXACT_BELOW:
        counts = await store.status_counts(conn)
    else:
        counts = await store.unfinished_counts(conn)
        unfinished = sum(sum(c.values()) for c in counts.values())
        sent_estimate = max(0, rows - unfinished)
    halted = await store.halted_keys(conn)
    return {
        "schema": names.schema,
        "server": await store.server(conn),
        "by_kind": counts,
        # A big table: sent rows are not counted (by_kind has none), this is the planner's
        # table size less the exact counts of the rest, as of the last ANALYZE.
        "sent_estimate": sent_estimate,
        "oldest_pending_seconds": await store.oldest_due_pending(conn),
        "dead": sum(c.get("dead", 0) for c in counts.values()),
        "ordering": {
            "halted_keys": halted.keys,
            "held_intents": halted.held_intents,
            "oldest_halted": None
            if halted.oldest_id is None
            else {
                "key": halted.oldest_key,
                "dead_intent": halted.oldest_id,
                "kind": halted.oldest_kind,
                "error": halted.oldest_error,
                "age_seconds": halted.oldest_age,
            },
        },
    }


def print_status(report: dict[str, Any], console: Console) -> None:
    statuses = ("pending", "processing", "sent", "dead")
    estimated = report.get("sent_estimate") is not None
    table = Table(title=f"outbox {report['schema']}.intent")
    table.add_column("kind")
    for s in statuses:
        table.add_column(s, justify="right")
    for kind, counts in sorted(report["by_kind"].items()):
        table.add_row(
            kind,
            *("-" if s == "sent" and estimated else str(counts.get(s, 0)) for s in statuses),
        )
    console.print(table)
    if estimated:
        console.print(
            f"sent: not counted on a table this big; about {report['sent_estimate']:,} in all "
            "(an estimate: the table's size as of its last ANALYZE, less the rest)",
            markup=False,
        )
    console.print(f"server: {report['server']}", markup=False)
    oldest = report["oldest_pending_seconds"]
    console.print(f"oldest due pending: {'none' if oldest is None else f'{oldest:.1f}s ago'}")
    console.print(
        f"dead: {report['dead']}" + ("  (see `outbox-worker retry-dead`)" if report["dead"] else "")
    )
    ordering = report["ordering"]
    if ordering["halted_keys"]:
        oldest = ordering["oldest_halted"]
        console.print(
            f"ordering keys halted by a dead intent: {ordering['halted_keys']}, holding "
            f"{ordering['held_intents']} intents; oldest: key {oldest['key']!r}, intent "
            f"{oldest['dead_intent']} ({oldest['kind']}): {oldest['error']}\n"
            "  re-run it: outbox-worker retry-dead --key KEY; move on without it: "
            "outbox-worker skip-dead KEY",
            markup=False,
        )


async def retry_dead(
    conn: asyncpg.Connection,
    names: Names,
    *,
    kind: str | None,
    intent_id: int | None,
    key: str | None = None,
) -> list[int]:
    return await Store(names).retry_dead(conn, kind=kind, intent_id=intent_id, key=key)


async def skip_dead(conn: asyncpg.Connection, names: Names, key: str) -> int | None:
    """The dead intent that halted ``key`` stays dead; the key's next intent may run."""
    return await Store(names).skip_dead(conn, key)


async def purge(
    conn: asyncpg.Connection, names: Names, older_than: float, statuses: list[str]
) -> int:
    """Delete finished intents in batches: short transactions, no long lock or WAL burst."""
    store = Store(names)
    deleted, after = 0, 0
    while True:
        batch = await store.purge_batch(
            conn,
            after=after,
            limit=_PURGE_BATCH,
            sent_older=older_than if "sent" in statuses else None,
            dead_older=older_than if "dead" in statuses else None,
        )
        deleted += batch.deleted
        after = batch.last_id
        if batch.last:
            return deleted


_PURGE_BATCH = 5000


async def enqueue(
    conn: asyncpg.Connection,
    names: Names,
    kind: str,
    payload: Any,
    *,
    run_at: datetime | None,
    dedupe_key: str | None,
    max_attempts: int | None,
    ordering_key: str | None = None,
) -> int:
    return await producer_enqueue(
        conn,
        kind,
        payload,
        run_at=run_at,
        dedupe_key=dedupe_key,
        max_attempts=max_attempts,
        ordering_key=ordering_key,
        schema=names.schema,
    )
