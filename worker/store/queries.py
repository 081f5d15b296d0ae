"""The one user of the project's runtime SQL (worker/store/sql/*.sql): a typed method per query.

Everything else asks the store: the relay's parts (claim, record, heartbeat, rescue, idle
flag), the health reads and the operator commands. Arguments go in as bind parameters in
the order the SQL numbers them, here and nowhere else; rows come back as ``Intent``s, ids,
counts and ``DbHealth``. A method takes the connection to run on (a dedicated connection, a
pool, or the caller's own connection): which one is the caller's concern.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, Protocol

import asyncpg

from worker.intent import Intent
from worker.outcome import Dead, Outcome, Released, Retry, Sent
from worker.store.rows import DbHealth, HaltedKeys, PurgeBatch
from worker.store.sqlfiles import Names, load_queries

_MAX_ERROR_CHARS = 2000


class Conn(Protocol):
    """What the store needs of a connection: asyncpg's Connection and Pool, and
    worker.connection.DedicatedConnection."""

    async def fetch(self, query: str, *args: Any) -> Sequence[Any]: ...
    async def fetchval(self, query: str, *args: Any) -> Any: ...
    async def execute(self, query: str, *args: Any) -> object: ...


class Floor(NamedTuple):
    """Where a claim starts in the pending index (run_at, id): the worker's lower bound
    below which nothing was pending at its last claim (see ``claim`` in sql/relay.sql)."""

    run_at: datetime
    id: int


FULL_SCAN = Floor(datetime.min.replace(tzinfo=UTC), 0)
# How far before its own start a claim puts the next floor at most: a producer transaction
# open longer than this whose row commits after the claim waits for the next full scan.
FLOOR_MARGIN = 1.0

Pooled = asyncpg.Pool | asyncpg.Connection  # reads that want fetchrow and a timeout


def _outcome_row(intent: Intent, outcome: Outcome) -> tuple[int, str, float, str | None, int]:
    """(id, status, delay, error, refund): one row of record_outcomes' unnest."""
    match outcome:
        case Sent():
            return intent.id, "sent", 0.0, None, 0
        case Retry(delay, error):
            return intent.id, "pending", delay, error[:_MAX_ERROR_CHARS], 0
        case Dead(error):
            return intent.id, "dead", 0.0, error[:_MAX_ERROR_CHARS], 0
        case Released(delay):
            return intent.id, "pending", delay, None, 1


def server_label(row: Any) -> str:
    """``127.0.0.1:5433 (primary)``: the server a connection is on (after a failover, the
    promoted standby's address); no address over a Unix socket."""
    where = row["server_addr"] or "local socket"
    role = "primary" if row["server_primary"] else "standby, read-only"
    return f"{where}:{row['server_port']} ({role})"


class Store:
    def __init__(self, names: Names) -> None:
        self.names = names
        self._q = load_queries(names)

    # --- the claim loop --------------------------------------------------------------------

    async def claim(
        self,
        conn: Conn,
        *,
        worker_id: str,
        lease: float,
        limit: int,
        skip_kinds: Sequence[str],
        default_max_attempts: int,
    ) -> list[Intent]:
        """Up to ``limit`` due rows, leased to ``worker_id`` for ``lease`` seconds, their
        attempt counted; none of ``skip_kinds``. A full scan (no floor)."""
        intents, _ = await self.claim_from(
            conn,
            FULL_SCAN,
            worker_id=worker_id,
            lease=lease,
            limit=limit,
            skip_kinds=skip_kinds,
            default_max_attempts=default_max_attempts,
        )
        return intents

    async def claim_from(
        self,
        conn: Conn,
        floor: Floor,
        *,
        worker_id: str,
        lease: float,
        limit: int,
        skip_kinds: Sequence[str],
        default_max_attempts: int,
        margin: float = FLOOR_MARGIN,
    ) -> tuple[list[Intent], Floor | None]:
        """``claim``, looking only at rows at or past ``floor`` (run_at, id); also the floor
        for the next claim (None when nothing was claimed: keep the old one)."""
        rows = await conn.fetch(self._q["claim"], worker_id, lease, limit, list(skip_kinds), *floor)
        if not rows:
            return [], None
        intents = [Intent.from_row(r, default_max_attempts) for r in rows]
        first = rows[0]
        cap = Floor(first["claimed_at"] - timedelta(seconds=margin), 0)
        if first["floor_id"] is None:
            return intents, cap
        return intents, min(cap, Floor(first["floor_run_at"], first["floor_id"]))

    async def hold_backlog(self, conn: Conn, limit: int, floor: Floor = FULL_SCAN) -> int:
        """Mark keyed rows that wait behind their key's head (among the first ``limit``
        due at or past ``floor``): out of the claim's way. How many it marked."""
        return int(await conn.fetchval(self._q["hold_backlog"], limit, *floor))

    async def next_due(self, conn: Conn, floor: Floor = FULL_SCAN) -> float | None:
        """Seconds until the next pending intent at or past ``floor`` is due (<= 0: now);
        None: none pending."""
        due: float | None = await conn.fetchval(self._q["next_due"], *floor)
        return due

    async def declare_idle(self, conn: Conn, backend_pid: int, worker_id: str) -> None:
        await conn.execute(self._q["declare_idle"], backend_pid, worker_id)

    async def declare_busy(self, conn: Conn, backend_pid: int) -> None:
        await conn.execute(self._q["declare_busy"], backend_pid)

    async def sweep_idle_workers(self, conn: Conn) -> None:
        await conn.execute(self._q["sweep_idle_workers"])

    async def rescue_expired(
        self, conn: Conn, *, max_attempts: int, keep: Iterable[int], skip_dead: bool
    ) -> list[str]:
        """Expired leases (any worker's, but ``keep``) back to pending, or dead past their
        attempts; the new status of each rescued row."""
        rows = await conn.fetch(self._q["rescue_expired"], max_attempts, list(keep), skip_dead)
        return [r["status"] for r in rows]

    # --- the rows held -----------------------------------------------------------------------

    async def record_outcomes(
        self,
        conn: Conn,
        worker_id: str,
        batch: Iterable[tuple[Intent, Outcome]],
        *,
        skip_dead: bool,
    ) -> set[int]:
        """One fenced write; the ids written (a row whose lease was lost is not)."""
        columns = list(zip(*(_outcome_row(i, o) for i, o in batch), strict=True))
        rows = await conn.fetch(self._q["record_outcomes"], worker_id, *columns, skip_dead)
        return {r["id"] for r in rows}

    async def heartbeat(
        self, conn: Conn, worker_id: str, ids: Sequence[int], lease: float
    ) -> set[int]:
        """Renew the leases of ``ids``; the ids no longer ours (recorded, or taken over).
        A row locked right now is neither: it is judged at the next beat."""
        rows = await conn.fetch(self._q["heartbeat"], worker_id, list(ids), lease)
        return {r["id"] for r in rows if not r["renewed"]}

    # --- health reads ------------------------------------------------------------------------

    async def db_health(self, conn: Pooled, *, cap: int, timeout: float) -> DbHealth:
        row = await conn.fetchrow(self._q["db_health"], cap, self.names.schema, timeout=timeout)
        assert row is not None  # the query always returns exactly one row
        waited = row["oldest_pending_run_at_age"]
        return DbHealth(
            pending_due=row["pending_due"],
            pending_later=row["pending_later"],
            pending_held=row["pending_held"],
            processing=row["processing"],
            dead=row["dead"],
            count_cap=cap,
            # a negative age is a run_at in the future: nothing is due
            oldest_due_seconds=waited if waited is not None and waited >= 0 else None,
            notify_queue_usage=row["notify_queue_usage"],
            idle_workers=row["idle_workers"],
            live_tuples=row["live_tuples"],
            dead_tuples=row["dead_tuples"],
            last_autovacuum_seconds=row["last_vacuum_age"],
            table_bytes=row["table_bytes"],
            oldest_xact_seconds=row["oldest_xact_age"],
            oldest_xact_pid=row["oldest_xact_pid"],
            oldest_xact_application=row["oldest_xact_application"] or None,
            halted_keys=row["halted_keys"],
            oldest_halted_key=row["oldest_halted_key"],
            oldest_halted_seconds=row["oldest_halted_age"],
            server=server_label(row),
            horizon_kind=row["horizon_kind"],
            horizon_state=row["horizon_state"],
            horizon_xids=row["horizon_xids"],
            index_bytes=row["index_bytes"],
        )

    async def server(self, conn: Pooled) -> str:
        row = await conn.fetchrow(self._q["server"])
        assert row is not None  # one row, always
        return server_label(row)

    async def status_counts(self, conn: Pooled) -> dict[str, dict[str, int]]:
        """Intents by kind, then by status."""
        counts: dict[str, dict[str, int]] = {}
        for r in await conn.fetch(self._q["status_counts"]):
            counts.setdefault(r["kind"], {})[r["status"]] = r["n"]
        return counts

    async def table_rows_estimate(self, conn: Pooled) -> int:
        """The planner's estimate of the intent table's rows (free; as of the last ANALYZE)."""
        return int(await conn.fetchval(self._q["status_table_rows"]) or 0)

    async def unfinished_counts(self, conn: Pooled) -> dict[str, dict[str, int]]:
        """Exact pending, processing and dead intents by kind, then by status (no sent)."""
        counts: dict[str, dict[str, int]] = {}
        for r in await conn.fetch(self._q["status_counts_unfinished"]):
            by_status = counts.setdefault(r["kind"], {})
            by_status[r["status"]] = by_status.get(r["status"], 0) + r["n"]
        return counts

    async def oldest_due_pending(self, conn: Pooled) -> float | None:
        """Age of the oldest intent that is due and still waiting (None: none)."""
        age: float | None = await conn.fetchval(self._q["status_oldest_pending"])
        return age

    async def halted_keys(self, conn: Pooled) -> HaltedKeys:
        row = await conn.fetchrow(self._q["halted_keys"])
        assert row is not None  # one row, always
        return HaltedKeys(
            row["halted_keys"],
            row["held_intents"],
            row["oldest_id"],
            row["oldest_key"],
            row["oldest_kind"],
            row["oldest_error"],
            row["oldest_age"],
        )

    # --- operator commands -------------------------------------------------------------------

    async def retry_dead(
        self,
        conn: asyncpg.Connection,
        *,
        kind: str | None,
        intent_id: int | None,
        key: str | None,
    ) -> list[int]:
        """Dead intents back to pending with a fresh budget; the workers are woken."""
        async with conn.transaction():
            rows = await conn.fetch(self._q["retry_dead"], kind, intent_id, key)
            if rows:  # an UPDATE fires no insert trigger: wake the workers ourselves
                await conn.execute(self._q["notify"])
        return [r["id"] for r in rows]

    async def skip_dead(self, conn: asyncpg.Connection, key: str) -> int | None:
        """The dead intent that halts ``key`` stays dead, skipped; its id (None: none)."""
        async with conn.transaction():
            skipped = await conn.fetchval(self._q["skip_dead"], key)
            if skipped is not None:
                await conn.execute(self._q["notify"])
        return None if skipped is None else int(skipped)

    async def purge_batch(
        self,
        conn: Conn,
        *,
        after: int,
        limit: int,
        sent_older: float | None,
        dead_older: float | None,
        keep_halting: bool = False,
        exclusive: bool = False,
    ) -> PurgeBatch:
        """Delete the finished intents past their age (seconds; None: keep that state) among
        the ``limit`` rows after id ``after``. ``keep_halting``: not a dead intent that holds
        up its ordering key. ``exclusive``: only with the retention lock, taken in this
        statement's transaction (``got`` False: another deleter had it, nothing was done)."""
        rows = await conn.fetch(
            self._q["purge"], sent_older, dead_older, limit, after, keep_halting, exclusive
        )
        row = rows[0]
        return PurgeBatch(
            got=row["got"],
            sent=row["sent"],
            dead=row["dead"],
            examined=row["examined"],
            last_id=row["last_id"] if row["last_id"] is not None else after,
            first_kept=row["first_kept"],
            young=row["young"],
            limit=limit,
        )

    async def oldest_finished(
        self, conn: Conn, after: int = 0
    ) -> tuple[float | None, float | None]:
        """Age in seconds of the oldest sent intent (since sent; the lowest id over ``after``)
        and dead one (since created)."""
        row = (await conn.fetch(self._q["retention_oldest"], after))[0]
        return row["sent"], row["dead"]

    # --- producers -----------------------------------------------------------------------------

    async def enqueue(
        self,
        conn: Conn,
        *,
        kind: str,
        payload_json: str,
        run_at: datetime | None,
        dedupe_key: str | None,
        max_attempts: int | None,
        ordering_key: str | None,
        trace_context_json: str | None,
    ) -> int:
        """The schema's enqueue(); the intent's id (the first one's, for a dedupe key)."""
        intent_id = await conn.fetchval(
            self._q["enqueue"],
            kind,
            payload_json,
            run_at,
            dedupe_key,
            max_attempts,
            ordering_key,
            trace_context_json,
        )
        return int(intent_id)
