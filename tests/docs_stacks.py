"""How to run each producer snippet of docs/producers.md as its stack would: the variables a
snippet uses (a connection, a session, an unsaved ``order``, a ``user_id``) are given, the
rest is the page's text as written."""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import psycopg
import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import NullPool

from tests.docs_text import Snippet, doc_snippet

PAGE, SECTION = "producers.md", "Enqueueing from your stack"
RAILS_HARNESS = Path(__file__).with_name("docs_rails.rb")


@dataclass(frozen=True)
class AppDb:
    """The test's own database: libpq keywords to reach it, and a connection for the checks."""

    server_dsn: str
    params: dict[str, str]
    conn: asyncpg.Connection


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
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",  # orders.id is a bigint
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
        message = (
            f"the Rails snippet of docs/producers.md needs Debian's {missing}:"
            f" apt-get install {missing}"
        )
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
        # ActiveRecord reads DATABASE_URL by itself (the test's server, not this database)
        **{k: v for k, v in os.environ.items() if k != "DATABASE_URL"},
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


async def run_snippet(stack: str, app: AppDb, user_id: int) -> None:
    runner = STACKS[stack]
    snippet = doc_snippet(PAGE, SECTION, "ruby" if runner is run_rails else "python", stack)
    if inspect.iscoroutinefunction(runner):
        await runner(app, snippet, user_id)
    else:
        # Off the event loop: Django refuses to touch the database from inside one.
        await anyio.to_thread.run_sync(runner, app, snippet, user_id)
