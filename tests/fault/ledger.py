"""The two records a fault test compares: the intent table, and what the SMTP server got.

``check_ledger`` states the suite's invariant once, for every test:

* every committed intent ends ``sent`` (and the server has it at least once) or ``dead``
  with a reason; nothing is left ``pending`` or ``processing``;
* no rolled-back intent is ever delivered, and nothing is delivered that was not committed;
* an intent is delivered more than once only if it was in flight at a fault, at most once
  more per fault it was in flight at.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field

import asyncpg

from tests.conftest import wait_until
from tests.smtp_server import ReceivedMessage, SmtpTestServer

_MESSAGE_ID_RE = re.compile(rb"^Message-ID: <outbox-(\d+)@", re.MULTILINE | re.IGNORECASE)


def intent_id_of(message: ReceivedMessage) -> int:
    match = _MESSAGE_ID_RE.search(message.data)
    assert match is not None, f"message without an outbox Message-ID: {message.data[:300]!r}"
    return int(match.group(1))


def delivered(server: SmtpTestServer) -> Counter[int]:
    """Deliveries per intent id: messages whose whole content reached the server and that
    it did not refuse. A connection dropped (or stalled) after DATA counts: the server has
    the message, the sender cannot know it, and its resend is a duplicate."""
    return Counter(
        intent_id_of(m) for m in server.messages if m.reply is None or m.reply.startswith("2")
    )


@dataclass(frozen=True)
class Fault:
    """One injected fault and the intents in flight (``processing``) when it struck."""

    what: str
    in_flight: frozenset[int]


@dataclass
class LedgerReport:
    counts: Counter[str]
    duplicates: int
    duplicated_ids: list[int]
    in_flight_total: int
    dead: dict[int, str] = field(default_factory=dict)

    def line(self) -> str:
        return (
            f"{dict(self.counts)}; duplicates {self.duplicates} "
            f"(in flight at faults: {self.in_flight_total})"
        )


class Outbox:
    """The test's view of one schema's intent table."""

    def __init__(self, conn: asyncpg.Connection, schema: str) -> None:
        self.conn = conn
        self.schema = schema
        self.table = f'"{schema}".intent'

    async def enqueue_emails(
        self, n: int, *, per_transaction: int = 1000, tag: str = ""
    ) -> list[int]:
        """``n`` valid email intents, committed ``per_transaction`` rows at a time."""
        ids: list[int] = []
        while len(ids) < n:
            k = min(per_transaction, n - len(ids))
            rows = await self.conn.fetch(
                f"INSERT INTO {self.table} (kind, payload) "
                "SELECT 'email', jsonb_build_object("
                "  'to', 'user' || g || '@example.com',"
                "  'subject', $2 || 'intent ' || g,"
                "  'text', 'hello ' || g) "
                "FROM generate_series(1, $1) AS g RETURNING id",
                k,
                tag,
            )
            ids.extend(r["id"] for r in rows)
        return ids

    async def rolled_back_emails(self, n: int) -> list[int]:
        """Insert ``n`` email intents and roll back: the ids are taken, the rows never visible."""
        tx = self.conn.transaction()
        await tx.start()
        try:
            return await self.enqueue_emails(n, per_transaction=n)
        finally:
            await tx.rollback()

    async def enqueue(
        self, kind: str, payload_json: str, *, max_attempts: int | None = None
    ) -> int:
        return int(
            await self.conn.fetchval(
                f'SELECT "{self.schema}".enqueue($1, $2::jsonb, max_attempts => $3)',
                kind,
                payload_json,
                max_attempts,
            )
        )

    async def counts(self) -> Counter[str]:
        rows = await self.conn.fetch(
            f"SELECT status, count(*) AS n FROM {self.table} GROUP BY status"
        )
        return Counter({r["status"]: r["n"] for r in rows})

    async def processing(self, locked_by_pid: int | None = None) -> frozenset[int]:
        """Ids held by a worker right now (by one process, given its pid)."""
        if locked_by_pid is None:
            rows = await self.conn.fetch(f"SELECT id FROM {self.table} WHERE status = 'processing'")
        else:
            rows = await self.conn.fetch(
                f"SELECT id FROM {self.table} WHERE status = 'processing' AND locked_by LIKE $1",
                f"%:{locked_by_pid}:%",
            )
        return frozenset(r["id"] for r in rows)

    async def settled(self) -> bool:
        """Nothing pending or processing."""
        return not await self.conn.fetchval(
            f"SELECT EXISTS (SELECT 1 FROM {self.table} WHERE status IN ('pending', 'processing'))"
        )

    async def wait_settled(self, timeout: float) -> None:
        await wait_until(self.settled, timeout=timeout, interval=0.1)

    async def rows(self) -> dict[int, asyncpg.Record]:
        rows = await self.conn.fetch(
            f"SELECT id, kind, status, attempts, last_error, locked_by FROM {self.table}"
        )
        return {r["id"]: r for r in rows}


async def check_ledger(
    outbox: Outbox,
    deliveries: Counter[int],
    *,
    committed: Iterable[int],
    rolled_back: Collection[int] = (),
    faults: Sequence[Fault] = (),
    may_be_dead: Collection[int] = (),
    tracked_kinds: Collection[str] = ("email",),
) -> LedgerReport:
    """Assert the suite's invariant (module docstring); return the numbers for the report.

    ``may_be_dead``: committed ids that are allowed to end ``dead`` (anything else dead is a
    failure). ``tracked_kinds``: kinds whose deliveries ``deliveries`` records.
    """
    committed = set(committed)
    rows = await outbox.rows()
    counts: Counter[str] = Counter(r["status"] for r in rows.values())
    problems: list[str] = []

    missing = committed - rows.keys()
    if missing:
        problems.append(f"committed intents missing from the table: {sorted(missing)[:10]}")
    unfinished = {
        i: r["status"] for i, r in rows.items() if r["status"] in ("pending", "processing")
    }
    if unfinished:
        problems.append(
            f"{len(unfinished)} intents not finished: {dict(list(unfinished.items())[:10])}"
        )
    dead = {i: r["last_error"] for i, r in rows.items() if r["status"] == "dead"}
    unexpected_dead = {i: e for i, e in dead.items() if i not in may_be_dead}
    if unexpected_dead:
        problems.append(f"dead but should not be: {dict(list(unexpected_dead.items())[:5])}")
    no_reason = [i for i, e in dead.items() if not e]
    if no_reason:
        problems.append(f"dead without a reason: {no_reason[:10]}")
    for i, r in rows.items():
        if r["status"] == "sent" and r["kind"] in tracked_kinds and deliveries[i] < 1:
            problems.append(f"intent {i} is 'sent' but the server never received it")
            break
    phantom = set(deliveries) - committed
    leaked = phantom & set(rolled_back)
    if leaked:
        problems.append(f"rolled-back intents delivered: {sorted(leaked)[:10]}")
    elif phantom:
        problems.append(f"delivered but never committed: {sorted(phantom)[:10]}")
    rolled_back_rows = set(rolled_back) & rows.keys()
    if rolled_back_rows:
        problems.append(f"rolled-back intents in the table: {sorted(rolled_back_rows)[:10]}")

    duplicated = sorted(i for i, n in deliveries.items() if n > 1)
    for i in duplicated:
        at_faults = sum(1 for f in faults if i in f.in_flight)
        if deliveries[i] - 1 > at_faults:
            problems.append(
                f"intent {i} delivered {deliveries[i]} times but in flight at {at_faults} faults"
            )
            break
    duplicates = sum(deliveries[i] - 1 for i in duplicated)
    in_flight_total = sum(len(f.in_flight) for f in faults)

    assert not problems, "invariant broken:\n  " + "\n  ".join(problems)
    return LedgerReport(counts, duplicates, duplicated, in_flight_total, dead)
