"""Every producer snippet of docs/producers.md runs here as written (tests/docs_text.py reads
it from the page), and so do the SQL snippets of the README, the getting-started and kind
pages and the tracing page, against a real PostgreSQL.

The snippets name the schema ``outbox``, so each test gets a database of its own with
``outbox`` migrated into it, the tables the snippets write (users, orders), and nothing shared
with other tests. A run whose commit succeeds must leave one order and one intent that carries
that order's real id; a run whose commit fails (the order's user does not exist: the foreign
key is checked at COMMIT, after the snippet's enqueue) must leave neither.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from psycopg.conninfo import conninfo_to_dict

from tests.docs_stacks import PAGE, SECTION, STACKS, AppDb, run_snippet
from tests.docs_text import Snippet, doc_fences, doc_snippet, doc_snippets
from worker.intent import Intent
from worker.settings import Settings, default_channel
from worker.sinks.email.message import build_message
from worker.sinks.kafka.record import Router
from worker.sinks.nats.sink import build_publish
from worker.sinks.rabbitmq.sink import build_message as build_amqp_message
from worker.sinks.webhook.sink import build_request
from worker.store.migrate import migrate
from worker.store.sqlfiles import Names

FOREIGN_KEY_VIOLATION = "23503"

APP_TABLES = """
CREATE TABLE users (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, email text);
CREATE TABLE orders (
    id          bigint GENERATED ALWAYS AS IDENTITY (START WITH 1001) PRIMARY KEY,
    -- Checked at COMMIT, after the snippet's enqueue: an order for a missing user makes the
    -- whole transaction fail where it matters.
    user_id     bigint NOT NULL REFERENCES users (id) DEFERRABLE INITIALLY DEFERRED,
    total_cents integer NOT NULL
);
"""


@pytest.fixture
async def app_db(pg_dsn: str) -> AsyncIterator[AppDb]:
    name = f"t_{secrets.token_hex(5)}"
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        conn = await asyncpg.connect(pg_dsn, database=name)
        try:
            await migrate(conn, Names("outbox", default_channel("outbox")))
            await conn.execute(APP_TABLES)
            yield AppDb(pg_dsn, {**conninfo_to_dict(pg_dsn), "dbname": name}, conn)
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def test_every_producer_snippet_has_a_runner() -> None:
    """A snippet added to the section without a runner here would never run."""
    first_lines = [s.first_line for s in doc_snippets(PAGE, SECTION)]
    assert len(first_lines) == len(STACKS), first_lines
    for marker in STACKS:
        assert sum(line.startswith(marker) for line in first_lines) == 1, (marker, first_lines)


@pytest.mark.parametrize("stack", STACKS, ids=lambda marker: marker.removeprefix("# "))
async def test_snippet_commits_the_order_and_its_intent(app_db: AppDb, stack: str) -> None:
    user_id = await app_db.conn.fetchval(
        "INSERT INTO users (email) VALUES ('a@example.com') RETURNING id"
    )
    await run_snippet(stack, app_db, user_id)

    (order,) = await app_db.conn.fetch("SELECT id, user_id FROM orders")
    assert order["user_id"] == user_id
    intents = await app_db.conn.fetch("SELECT kind, payload FROM outbox.intent")
    assert [(r["kind"], json.loads(r["payload"])) for r in intents] == [
        ("order_created", {"order_id": order["id"]})
    ]


@pytest.mark.parametrize("stack", STACKS, ids=lambda marker: marker.removeprefix("# "))
async def test_snippet_whose_commit_fails_leaves_no_intent(app_db: AppDb, stack: str) -> None:
    missing_user = 404
    with pytest.raises(Exception) as failed:  # each stack wraps the error its own way
        await run_snippet(stack, app_db, missing_user)
    assert _sqlstate(failed.value) == FOREIGN_KEY_VIOLATION, failed.value

    # The enqueue did run (the identity sequence moved on), and the rollback took it back.
    sequence = await app_db.conn.fetchval("SELECT pg_get_serial_sequence('outbox.intent', 'id')")
    assert await app_db.conn.fetchval(f"SELECT is_called FROM {sequence}")
    assert await app_db.conn.fetchval("SELECT count(*) FROM outbox.intent") == 0
    assert await app_db.conn.fetchval("SELECT count(*) FROM orders") == 0


def _sqlstate(error: BaseException | None) -> str | None:
    """PostgreSQL's error code, from the driver's exception however deep a library wrapped it."""
    while error is not None:
        if isinstance(getattr(error, "sqlstate", None), str):
            return str(error.sqlstate)  # type: ignore[attr-defined]
        error = error.__cause__
    return None


@pytest.mark.parametrize(
    ("page", "heading"),
    [("README.md", "Quick start"), ("getting-started.md", "Against your own database")],
)
async def test_quick_start_sql_commits_the_user_and_an_email_the_sink_accepts(
    app_db: AppDb, page: str, heading: str
) -> None:
    await app_db.conn.execute(doc_snippet(page, heading, "sql").text)

    emails = await app_db.conn.fetch("SELECT email FROM users")
    (intent,) = await app_db.conn.fetch("SELECT * FROM outbox.intent")
    assert intent["kind"] == "email"
    _, _, recipients = build_message(intent_from_row(intent), "app@example.com")
    assert recipients == [r["email"] for r in emails]


BUILDERS: dict[str, Any] = {
    "email": lambda intent: build_message(intent, "app@example.com"),
    "webhook": build_request,
    "rabbitmq": build_amqp_message,
    "nats": build_publish,
}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
async def test_kind_payload_sql_enqueues_a_payload_its_sink_accepts(
    app_db: AppDb, kind: str
) -> None:
    await app_db.conn.execute(doc_snippet(f"kinds/{kind}.md", "Payload", "sql").text)

    (row,) = await app_db.conn.fetch("SELECT * FROM outbox.intent")
    assert row["kind"] == kind
    BUILDERS[kind](intent_from_row(row))  # raises PermanentError for a payload it cannot send


@pytest.mark.parametrize(
    ("heading", "topic"), [("Payload", "orders"), ("Debezium outbox rows", "outbox.event.Order")]
)
async def test_kafka_payload_sql_makes_the_record_the_page_describes(
    app_db: AppDb, heading: str, topic: str
) -> None:
    """Both kafka snippets: a record keyed by the intent's ordering key, on the topic the page
    names (a Debezium row's routed by its aggregatetype)."""
    await app_db.conn.execute(doc_snippet("kinds/kafka.md", heading, "sql").text)

    (row,) = await app_db.conn.fetch("SELECT * FROM outbox.intent")
    record = Router().record(intent_from_row(row))
    assert (record.topic, record.key) == (topic, row["ordering_key"].encode())


OPERATOR_QUERIES: list[tuple[str, str, Snippet]] = [
    (page, heading, snippet)
    for page in ("operating/troubleshooting.md", "concepts/intents.md")
    for heading, snippet in doc_fences(page, "sql")
]


@pytest.mark.parametrize(
    "query", [q[2] for q in OPERATOR_QUERIES], ids=[f"{p}:{h}" for p, h, _ in OPERATOR_QUERIES]
)
async def test_every_operator_query_runs(app_db: AppDb, query: Snippet) -> None:
    """The queries an operator copies from the troubleshooting and intent pages are valid
    against the schema as it is (each statement of the block, as written)."""
    await app_db.conn.execute("SELECT outbox.enqueue('email', '{}')")
    await app_db.conn.execute(query.text)  # several statements: the simple query protocol


def intent_from_row(row: asyncpg.Record) -> Intent:
    """The intent as a delivery sees it (the payload decoded, as the worker's pool does)."""
    return Intent(
        row["id"],
        row["kind"],
        json.loads(row["payload"]),
        row["attempts"],
        row["max_attempts"] or Settings().max_attempts,
        row["created_at"],
        row["run_at"],
        row["ordering_key"],
    )


# --- Tracing -----------------------------------------------------------------------------------


async def test_tracing_asyncpg_snippet_stores_the_current_spans_context(
    app_db: AppDb, traces: Any
) -> None:
    from tests.tracing_helpers import traceparent

    user_id = await app_db.conn.fetchval(
        "INSERT INTO users (email) VALUES ('a@x.org') RETURNING id"
    )
    snippet = doc_snippet("operating/tracing.md", "Producers", "python", "# asyncpg")
    conn = await asyncpg.connect(app_db.server_dsn, database=app_db.params["dbname"])
    try:
        await eval(snippet.compile(), {"conn": conn, "user_id": user_id, "tracer": traces.tracer})
    finally:
        await conn.close()
    [span] = traces.exporter.get_finished_spans()
    (intent,) = await app_db.conn.fetch("SELECT payload, trace_context FROM outbox.intent")
    assert json.loads(intent["trace_context"]) == {"traceparent": traceparent(span.context)}
    assert span.name == "place order" and "order_id" in json.loads(intent["payload"])


async def test_tracing_sql_snippet_stores_what_it_says(app_db: AppDb) -> None:
    snippet = doc_snippet("operating/tracing.md", "Producers", "sql").text
    await app_db.conn.execute(snippet)
    (intent,) = await app_db.conn.fetch("SELECT kind, trace_context FROM outbox.intent")
    literal = snippet.split("trace_context => '")[1].split("'")[0]
    assert intent["kind"] == "order_created"
    assert json.loads(intent["trace_context"]) == json.loads(literal)
    assert set(json.loads(literal)) == {"traceparent", "tracestate"}
