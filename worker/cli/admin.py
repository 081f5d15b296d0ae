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


async def status(conn: asyncpg.Connection, names: Names) -> dict[str, Any]:
    store = Store(names)
    counts = await store.status_counts(conn)
    halted = await store.halted_keys(conn)
    return {
        "schema": names.schema,
        "server": await store.server(conn),
        "by_kind": counts,
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
    table = Table(title=f"outbox {report['schema']}.intent")
    table.add_column("kind")
    for s in statuses:
        table.add_column(s, justify="right")
    for kind, counts in sorted(report["by_kind"].items()):
        table.add_row(kind, *(str(counts.get(s, 0)) for s in statuses))
    console.print(table)
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
