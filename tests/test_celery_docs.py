"""The Celery snippet of docs/kinds/celery.md, run as written: the user and the
intent commit together, a real Celery worker runs ``myapp.tasks.send_welcome(user_id)``; a
rolled-back transaction leaves neither a user nor a task."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import psycopg
import pytest

from tests.celery_worker import CeleryWorker, running_worker
from tests.conftest import statuses_are, wait_until
from tests.docs_text import doc_snippets
from worker.sinks.celery import celery_sink
from worker.store.sqlfiles import Names

SNIPPET = next(
    s.text
    for s in doc_snippets("kinds/celery.md", "Moving a Celery app to the outbox", "python")
    if "outbox.enqueue('celery'" in s.text
)


class RolledBack(Exception):
    pass


@pytest.fixture(params=["amqp", "redis"])
async def worker(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[CeleryWorker]:
    async with running_worker(request.param, tmp_path) as celery:
        yield celery


def _run_snippet(dsn: str, schema: str, queue: str) -> int:
    """The snippet once committed, once inside a transaction that rolls back; the user id."""
    # The test's own schema and queue instead of outbox and Celery's default queue.
    code = SNIPPET.replace("outbox.", f"{schema}.").replace(  # t_<hex>: no quotes needed
        '"args": [user_id]', f'"args": [user_id], "queue": "{queue}"'
    )
    with psycopg.connect(dsn) as conn:
        conn.execute(f'CREATE TABLE "{schema}".users (id serial PRIMARY KEY, email text)')
        conn.execute(f'SET search_path TO "{schema}"')
        conn.commit()
        exec(code, {"conn": conn, "email": "ada@example.com", "json": json})
        with pytest.raises(RolledBack), conn.transaction():
            exec(code, {"conn": conn, "email": "bob@example.com", "json": json})
            raise RolledBack
        emails = conn.execute("SELECT id, email FROM users").fetchall()
    assert [e for _, e in emails] == ["ada@example.com"]
    return int(emails[0][0])


async def test_the_readme_celery_snippet_runs(
    pg_dsn: str, db, names: Names, start_relay, worker: CeleryWorker
) -> None:
    assert "send_welcome.delay" not in SNIPPET and "myapp.tasks.send_welcome" in SNIPPET
    user_id = await anyio.to_thread.run_sync(_run_snippet, pg_dsn, names.schema, worker.queue)
    sink = celery_sink(worker.url, timeout=10)
    try:
        async with start_relay({"celery": sink}):
            await wait_until(lambda: statuses_are(db, names, {"sent": 1}))
    finally:
        await sink.aclose()
    [run] = await worker.ran(1)
    intent_id = await db.fetchval(f'SELECT id FROM "{names.schema}".intent')
    assert run["task"] == "myapp.tasks.send_welcome" and run["args"] == [user_id]
    assert run["id"] == str(
        uuid.uuid5(uuid.UUID("f9cae757-3d31-418a-a090-f8b8b95f7e1b"), str(intent_id))
    )
