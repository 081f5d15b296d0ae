"""Every producer snippet of the README's "Enqueueing from your stack" runs here as written
(tests/readme.py reads it from README.md), against a real PostgreSQL.

The snippets name the schema ``outbox``, so each test gets a database of its own with
``outbox`` migrated into it, the tables the snippets write (users, orders), and nothing shared
with other tests. A run whose commit succeeds must leave one order and one intent that carries
that order's real id; a run whose commit fails (the order's user does not exist: the foreign
key is checked at COMMIT, after the snippet's enqueue) must leave neither.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import NullPool

from tests.readme import Snippet, readme_snippet, readme_snippets
from worker.migrate import migrate
from worker.settings import default_channel
from worker.sqlfiles import Names

SECTION = "Enqueueing from your stack"
RAILS_HARNESS = Path(__file__).with_name("readme_rails.rb")
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


@dataclass(frozen=True)
class AppDb:
    """The test's own database: libpq keywords to reach it, and a connection for the checks."""

    server_dsn: str
    params: dict[str, str]
    conn: asyncpg.Connection


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


# --- one runner per stack: runs the snippet with the variables it uses given --------------


async def run_asyncpg(app: AppDb, snippet: Snippet, user_id: int) -> None:
    conn = await asyncpg.connect(app.server_dsn, database=app.params["dbname"])
    try:
        await eval(snippet.compile(), {"conn": conn, "user_id": user_id})
    finally:
        await conn.close()


def run_psycopg(app: AppDb, snippet: Snippet, user_id: int) -> None:
    # autocommit: psycopg's advice when transaction() blocks delimit the transactions
    with psycopg.connect(**app.params, autocommit=True) as conn:
        exec(snippet.compile(), {"conn": conn, "user_id": user_id})


class _Base(DeclarativeBase):
    pass


class SqlAlchemyOrder(_Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int]
    total_cents: Mapped[int]


def run_sqlalchemy(app: AppDb, snippet: Snippet, user_id: int) -> None:
    engine = create_engine("postgresql+psycopg://", connect_args=app.params, poolclass=NullPool)
    try:
        with Session(engine) as session:
            order = SqlAlchemyOrder(user_id=user_id, total_cents=1999)
            exec(snippet.compile(), {"session": session, "order": order})
    finally:
        engine.dispose()


@cache
def _django_order_model() -> Any:
    """Django configured in-process (once: settings are global), and an Order model."""
    import django
    from django.conf import settings
    from django.db import models

    settings.configure(
        DATABASES={"default": {"ENGINE": "django.db.backends.postgresql"}},
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        USE_TZ=True,
    )
    django.setup()

    class Order(models.Model):
        user_id = models.BigIntegerField()
        total_cents = models.IntegerField()

        class Meta:
            app_label = "readme"
            db_table = "orders"
            managed = False

    return Order


def run_django(app: AppDb, snippet: Snippet, user_id: int) -> None:
    order_model = _django_order_model()
    from django.db import connection

    # Pointing the alias at this test's database is what Django's own test runner does.
    connection.settings_dict.update(
        NAME=app.params["dbname"],
        USER=app.params.get("user", ""),
        PASSWORD=app.params.get("password", ""),
        HOST=app.params.get("host", ""),
        PORT=app.params.get("port", ""),
    )
    try:
        exec(snippet.compile(), {"order": order_model(user_id=user_id, total_cents=1999)})
    finally:
        connection.close()


class RubyError(Exception):
    """The Ruby snippet failed; ``sqlstate`` is what PostgreSQL said, if it said anything."""

    def __init__(self, stderr: str) -> None:
        super().__init__(stderr)
        found = re.search(r"^sqlstate (\w{5}):", stderr, re.MULTILINE)
        self.sqlstate = found[1] if found else None


async def run_rails(app: AppDb, snippet: Snippet, user_id: int) -> None:
    missing = _missing_ruby()
    if missing:
        message = f"the README's Rails snippet needs Debian's {missing}: apt-get install {missing}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    params = app.params
    connection = {
        "host": params.get("host"),
        "port": params.get("port"),
        "username": params.get("user"),
        "password": params.get("password"),
        "database": params["dbname"],
    }
    env = {
        **os.environ,
        "README_DB": json.dumps({k: v for k, v in connection.items() if v is not None}),
        "README_USER_ID": str(user_id),
        "README_LINE": str(snippet.line),
    }
    done = await anyio.run_process(
        ["ruby", str(RAILS_HARNESS)], input=snippet.text.encode(), env=env, check=False
    )
    if done.returncode != 0:
        raise RubyError(done.stderr.decode(errors="replace"))


@cache
def _missing_ruby() -> str:
    """The Debian packages the Rails snippet needs that are not installed ('' if none)."""
    if shutil.which("ruby") is None:
        return "ruby ruby-activerecord ruby-pg"
    libraries = {"active_record": "ruby-activerecord", "pg": "ruby-pg"}
    return " ".join(
        package
        for library, package in libraries.items()
        if subprocess.run(["ruby", "-e", f"require '{library}'"], capture_output=True).returncode
    )


Runner = Callable[[AppDb, Snippet, int], Awaitable[None] | None]

# The first line of each snippet (its marker comment) -> how to run it.
STACKS: dict[str, Runner] = {
    "# asyncpg": run_asyncpg,
    "# psycopg 3": run_psycopg,
    "# SQLAlchemy": run_sqlalchemy,
    "# Django": run_django,
    "# Rails": run_rails,
}


def _section_snippets() -> list[Snippet]:
    return readme_snippets(SECTION, "python") + readme_snippets(SECTION, "ruby")


def test_every_producer_snippet_has_a_runner() -> None:
    """A snippet added to the section without a runner here would never run."""
    first_lines = [s.first_line for s in _section_snippets()]
    assert len(first_lines) == len(STACKS), first_lines
    for marker in STACKS:
        assert sum(line.startswith(marker) for line in first_lines) == 1, (marker, first_lines)


async def _run(stack: str, app: AppDb, user_id: int) -> None:
    runner = STACKS[stack]
    snippet = readme_snippet(SECTION, "ruby" if runner is run_rails else "python", stack)
    if inspect.iscoroutinefunction(runner):
        await runner(app, snippet, user_id)
    else:
        # Off the event loop: Django refuses to touch the database from inside one.
        await anyio.to_thread.run_sync(runner, app, snippet, user_id)


@pytest.mark.parametrize("stack", STACKS, ids=lambda marker: marker.removeprefix("# "))
async def test_snippet_commits_the_order_and_its_intent(app_db: AppDb, stack: str) -> None:
    user_id = await app_db.conn.fetchval(
        "INSERT INTO users (email) VALUES ('a@example.com') RETURNING id"
    )
    await _run(stack, app_db, user_id)

    orders = await app_db.conn.fetch("SELECT id, user_id, total_cents FROM orders")
    assert [tuple(r) for r in orders] == [(orders[0]["id"], user_id, 1999)]
    intents = await app_db.conn.fetch("SELECT kind, payload FROM outbox.intent")
    assert [(r["kind"], json.loads(r["payload"])) for r in intents] == [
        ("order_created", {"order_id": orders[0]["id"]})
    ]


@pytest.mark.parametrize("stack", STACKS, ids=lambda marker: marker.removeprefix("# "))
async def test_snippet_whose_commit_fails_leaves_no_intent(app_db: AppDb, stack: str) -> None:
    missing_user = 404
    with pytest.raises(Exception) as failed:  # each stack wraps the error its own way
        await _run(stack, app_db, missing_user)
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
