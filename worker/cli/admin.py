"""Operator commands: status, retry-dead, skip-dead, purge, enqueue."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg
from rich.console import Console
from rich.table import Table

from worker.observe.health import server_label
from worker.producer import enqueue as producer_enqueue
from worker.store.sqlfiles import Names, load_queries


async def status(conn: asyncpg.Connection, names: Names) -> dict[str, Any]:
    q = load_queries(names)
    rows = await conn.fetch(q["status_counts"])
    counts: dict[str, dict[str, int]] = {}
    for r in rows:
        counts.setdefault(r["kind"], {})[r["status"]] = r["n"]
    oldest = await conn.fetchval(q["status_oldest_pending"])
    dead = sum(c.get("dead", 0) for c in counts.values())
    halted = await conn.fetchrow(q["halted_keys"])
    assert halted is not None  # one row, always
    server = await conn.fetchrow(q["server"])
    assert server is not None  # one row, always
    return {
        "schema": names.schema,
        "server": server_label(server),
        "by_kind": counts,
        "oldest_pending_seconds": oldest,
        "dead": dead,
        "ordering": {
            "halted_keys": halted["halted_keys"],
            "held_intents": halted["held_intents"],
            "oldest_halted": None
            if halted["oldest_id"] is None
            else {
                "key": halted["oldest_key"],
                "dead_intent": halted["oldest_id"],
                "kind": halted["oldest_kind"],
                "error": halted["oldest_error"],
                "age_seconds": halted["oldest_age"],
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
    q = load_queries(names)
    async with conn.transaction():
        rows = await conn.fetch(q["retry_dead"], kind, intent_id, key)
        if rows:  # an UPDATE fires no insert trigger: wake the workers ourselves
            await conn.execute(q["notify"])
    return [r["id"] for r in rows]


async def skip_dead(conn: asyncpg.Connection, names: Names, key: str) -> int | None:
    """The dead intent that halted ``key`` stays dead; the key's next intent may run."""
    q = load_queries(names)
    async with conn.transaction():
        skipped = await conn.fetchval(q["skip_dead"], key)
        if skipped is not None:
            await conn.execute(q["notify"])
    return int(skipped) if skipped is not None else None


async def purge(
    conn: asyncpg.Connection, names: Names, older_than: float, statuses: list[str]
) -> int:
    """Delete finished intents in batches: short transactions, no long lock or WAL burst."""
    query = load_queries(names)["purge"]
    deleted = 0
    while True:
        batch = await conn.fetchval(query, older_than, statuses, _PURGE_BATCH)
        deleted += batch
        if batch < _PURGE_BATCH:
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
