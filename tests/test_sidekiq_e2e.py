"""End to end with a real Sidekiq server (Debian's ruby-sidekiq) and a Ruby ActiveRecord app.

The app is the snippets of docs/kinds/sidekiq.md, "Moving a Sidekiq app to the outbox", read
from the page (tests/sidekiq_app/app.rb is the glue a Rails app would have around them):
`User.sign_up!` creates the user and enqueues the intent in one transaction, `WelcomeEmailJob`
records its jid and user id in PostgreSQL. The relay pushes into a Redis database of the
test's own; `sidekiq` runs the jobs from there.

Without ruby-sidekiq, ruby-activerecord and ruby-pg these tests skip in one line (in CI they
fail: .ci/run installs the packages).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import asyncpg
import orjson
import pytest

from tests import sidekiq_helpers
from tests.conftest import failed_at_least_once, statuses_are, wait_until
from tests.docs_text import doc_section, doc_snippets
from tests.services import stop_process
from tests.sidekiq_helpers import RedisDb
from tests.tcp_proxy import TcpProxy
from worker.intent import Intent
from worker.producer import enqueue
from worker.sinks.sidekiq.sink import SidekiqSink, job_id
from worker.store.sqlfiles import Names

redis_db = sidekiq_helpers.redis_db  # the fixture: an empty Redis database of the test's own
APP = Path(__file__).resolve().parent / "sidekiq_app"
PACKAGES = "ruby-sidekiq ruby-activerecord ruby-pg"


@functools.cache
def _ruby_missing() -> str | None:
    if not shutil.which("sidekiq") or not shutil.which("ruby"):
        return "the sidekiq command is not installed"
    check = subprocess.run(
        ["ruby", "-e", 'require "sidekiq"; require "active_record"; require "pg"'],
        capture_output=True,
        text=True,
    )
    return check.stderr.strip().splitlines()[0] if check.returncode else None


@pytest.fixture(autouse=True)
def _needs_ruby_sidekiq() -> None:
    why = _ruby_missing()
    if why:
        message = f"Sidekiq tests need {PACKAGES} ({why}): apt-get install -y {PACKAGES}"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


# --- the page's snippets ---------------------------------------------------------------------

PAGE = "kinds/sidekiq.md"
BEFORE, AFTER, JOB = (
    s.text for s in doc_snippets(PAGE, "Moving a Sidekiq app to the outbox", "ruby")
)


@dataclass
class App:
    """The Ruby app, with the page's "before" or "after" User model."""

    env: dict[str, str]
    db: asyncpg.Connection
    schema: str

    async def sign_up(self, *emails: str) -> dict[str, int]:
        """Run sign_up.rb: {email: user id} (rolled-back users included). A process of its
        own, awaited: the relay in this event loop keeps running meanwhile."""
        with anyio.fail_after(120):
            done = await anyio.run_process(
                ["ruby", str(APP / "sign_up.rb"), *emails], env=self.env, check=False
            )
        assert done.returncode == 0, done.stderr.decode()
        return {k: int(v) for k, v in json.loads(done.stdout.splitlines()[-1]).items()}

    async def emails(self) -> list[dict[str, Any]]:
        rows = await self.db.fetch(
            f'SELECT jid, user_id, created_at FROM "{self.schema}".welcome_emails ORDER BY id'
        )
        return [dict(r) for r in rows]

    async def intent_ids(self) -> dict[int, int]:
        """{user id: intent id} of the intents the app enqueued."""
        rows = await self.db.fetch(
            f"SELECT id, (payload->'args'->>0)::bigint AS user_id "
            f'FROM "{self.schema}".intent ORDER BY id'
        )
        return {r["user_id"]: r["id"] for r in rows}


def _app(tmp_path: Path, pg_dsn: str, db: asyncpg.Connection, names: Names, redis_url: str,
         model: str) -> App:  # fmt: skip
    snippets = tmp_path / "snippets"
    snippets.mkdir(exist_ok=True)
    # The page's SQL names the default schema; this test's schema is its own.
    (snippets / "user.rb").write_text(model.replace("outbox.", f"{names.schema}."))
    (snippets / "welcome_email_job.rb").write_text(JOB)
    env = {
        **os.environ,
        "DATABASE_URL": pg_dsn,
        "OUTBOX_TEST_SCHEMA": names.schema,
        "REDIS_URL": redis_url,
        "OUTBOX_SNIPPETS": str(snippets),
    }
    return App(env, db, names.schema)


@pytest.fixture
async def tables(db: asyncpg.Connection, names: Names) -> None:
    """The app's tables, in the test's schema (dropped with it)."""
    await db.execute(
        f'CREATE TABLE "{names.schema}".users (id bigserial PRIMARY KEY, email text NOT NULL); '
        f'CREATE TABLE "{names.schema}".welcome_emails (id bigserial PRIMARY KEY, '
        "jid text NOT NULL UNIQUE, user_id bigint NOT NULL, created_at timestamptz NOT NULL "
        "DEFAULT clock_timestamp())"
    )


@pytest.fixture
def app(tmp_path: Path, pg_dsn: str, db, names: Names, redis_db: RedisDb, tables) -> App:
    return _app(tmp_path, pg_dsn, db, names, redis_db.url, AFTER)


@pytest.fixture
def sidekiq(app: App, tmp_path: Path) -> Iterator[Path]:
    """A Sidekiq server on the app's "default" queue; yields its log file."""
    log = tmp_path / "sidekiq.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            ["sidekiq", "-r", str(APP / "app.rb"), "-q", "default", "-c", "4", "-t", "2"],
            env=app.env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
        )  # fmt: skip
        try:
            yield log
        finally:
            stop_process(server, timeout=20)


async def _all_ran(app: App, user_ids: list[int], log: Path) -> bool:
    """For ``wait_until``: every user's job ran; fails at once if the server could not load
    the app or run the job (instead of waiting out the timeout)."""
    _fail_on_server_errors(log)
    return sorted(e["user_id"] for e in await app.emails()) == sorted(user_ids)


def _fail_on_server_errors(log: Path) -> None:
    text = log.read_text() if log.exists() else ""
    if "NameError" in text or "Error while loading" in text:
        raise AssertionError(text[-3000:])


# --- the tests -------------------------------------------------------------------------------


async def test_committed_users_get_their_job_rolled_back_ones_never_across_a_redis_outage(
    app: App,
    sidekiq: Path,
    redis_db: RedisDb,
    start_relay,
    db,
    names: Names,
) -> None:
    redis_port = urlsplit(redis_db.url).port or 6379
    async with TcpProxy("127.0.0.1", redis_port) as proxy:
        sink = SidekiqSink(proxy.rewrite(redis_db.url), timeout=2)
        try:
            async with start_relay({"sidekiq": sink}, backoff_base=0.1, backoff_max=0.5):
                first = await app.sign_up("alice@example.com", "rollback:mallory@example.com",
                                    "bob@example.com", "carol@example.com")  # fmt: skip
                committed = [first[e] for e in ("alice", "bob", "carol")
                             for e in [f"{e}@example.com"]]  # fmt: skip
                await wait_until(lambda: _all_ran(app, committed, sidekiq), timeout=60)

                await proxy.stop()  # Redis unreachable for the relay (Sidekiq still sees it)
                second = await app.sign_up("dave@example.com", "rollback:eve@example.com",
                                     "frank@example.com")  # fmt: skip
                committed += [second["dave@example.com"], second["frank@example.com"]]
                await wait_until(lambda: failed_at_least_once(db, names, 2))
                await proxy.start()
                await wait_until(lambda: statuses_are(db, names, {"sent": 5}), timeout=30)
                await wait_until(lambda: _all_ran(app, committed, sidekiq), timeout=60)
        finally:
            await sink.aclose()
    intents = await app.intent_ids()
    assert sorted(intents) == sorted(committed)  # the rolled-back users left no intent
    emails = await app.emails()
    assert {e["user_id"]: e["jid"] for e in emails} == {u: job_id(i) for u, i in intents.items()}
    rolled_back = {first["mallory@example.com"], second["eve@example.com"]}
    assert not rolled_back & {e["user_id"] for e in emails}
    # Every job ran and left its queue; none failed into Sidekiq's retry set.
    assert await redis_db.client.llen("queue:default") == 0
    assert await redis_db.client.zcard("retry") == 0


async def test_a_scheduled_job_waits_in_the_schedule_set_then_runs(
    app: App,
    sidekiq: Path,
    redis_db: RedisDb,
    start_relay,
    db,
    names: Names,
) -> None:
    [user_id] = (await app.sign_up("grace@example.com")).values()
    at = time.time() + 10
    scheduled = await enqueue(
        db, "sidekiq", {"class": "WelcomeEmailJob", "args": [user_id], "at": at},
        schema=names.schema,
    )  # fmt: skip
    sink = SidekiqSink(redis_db.url)
    try:
        async with start_relay({"sidekiq": sink}):
            await wait_until(lambda: statuses_are(db, names, {"sent": 2}))
            entries = await redis_db.client.zrange("schedule", 0, -1, withscores=True)
            assert [(orjson.loads(m)["jid"], score) for m, score in entries] == [
                (job_id(scheduled), pytest.approx(at))
            ]
            await wait_until(lambda: _all_ran(app, [user_id, user_id], sidekiq), timeout=60)
    finally:
        await sink.aclose()
    immediate, later = await app.emails()
    assert later["jid"] == job_id(scheduled) and immediate["jid"] != later["jid"]
    assert later["created_at"].timestamp() >= at  # it ran when due, not before
    assert await redis_db.client.zcard("schedule") == 0


async def test_payload_errors_are_dead_with_the_reason_and_the_others_run(
    app: App,
    sidekiq: Path,
    redis_db: RedisDb,
    start_relay,
    db,
    names: Names,
) -> None:
    users = await app.sign_up("heidi@example.com", "ivan@example.com")
    bad = {
        await enqueue(db, "sidekiq", {"args": [1]}, schema=names.schema): "needs 'class'",
        await enqueue(
            db, "sidekiq", {"class": "WelcomeEmailJob", "args": {"user_id": 1}},
            schema=names.schema,
        ): "'args' must be a list, got dict",
    }  # fmt: skip
    sink = SidekiqSink(redis_db.url)
    try:
        async with start_relay({"sidekiq": sink}):
            await wait_until(lambda: statuses_are(db, names, {"sent": 2, "dead": 2}))
            await wait_until(lambda: _all_ran(app, list(users.values()), sidekiq), timeout=60)
    finally:
        await sink.aclose()
    rows = await db.fetch(
        f"SELECT id, last_error FROM \"{names.schema}\".intent WHERE status = 'dead'"
    )
    assert {r["id"] for r in rows} == set(bad)
    for r in rows:
        assert r["last_error"].startswith("sidekiq ") and bad[r["id"]] in r["last_error"]


async def test_the_before_snippet_pushes_the_same_job_the_worker_pushes(
    tmp_path: Path,
    pg_dsn: str,
    db,
    names: Names,
    redis_db: RedisDb,
    tables,
) -> None:
    """No server: Sidekiq's own client (the page's "before") and the sink each push one job;
    the two hashes have the same fields, of the same JSON types."""
    before = _app(tmp_path, pg_dsn, db, names, redis_db.url, BEFORE)
    [user_id] = (await before.sign_up("judy@example.com")).values()
    [theirs] = await redis_db.client.lrange("queue:default", 0, -1)
    intent = await enqueue(
        db, "sidekiq", {"class": "WelcomeEmailJob", "args": [user_id]}, schema=names.schema
    )
    sink = SidekiqSink(redis_db.url)
    try:
        row = await db.fetchrow(f'SELECT * FROM "{names.schema}".intent WHERE id = $1', intent)
        await sink.deliver(Intent(id=row["id"], kind="sidekiq", payload={
            "class": "WelcomeEmailJob", "args": [user_id]}, attempts=1, max_attempts=1,
            created_at=row["created_at"], run_at=row["run_at"]))  # fmt: skip
    finally:
        await sink.aclose()
    ours = (await redis_db.client.lrange("queue:default", 0, 0))[0]
    mine, sidekiqs = orjson.loads(ours), orjson.loads(theirs)
    assert {k: type(v) for k, v in mine.items()} == {k: type(v) for k, v in sidekiqs.items()}
    different = {"jid", "created_at", "enqueued_at"}
    assert {k: v for k, v in mine.items() if k not in different} == {
        k: v for k, v in sidekiqs.items() if k not in different
    }
    assert mine["jid"] == job_id(intent) and len(sidekiqs["jid"]) == len(mine["jid"])
    assert await redis_db.client.smembers("queues") == {b"default"}


def test_the_documented_jid_derivation_in_ruby_matches() -> None:
    formula = 'Digest::SHA256.hexdigest("#{prefix}#{intent_id}")[0, 24]'
    assert formula in doc_section(PAGE, "The `jid`")
    ruby = subprocess.run(
        ["ruby", "-rdigest", "-e", f'prefix, intent_id = ARGV; print {formula}', "eu-", "42"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert ruby.stdout == job_id(42, "eu-")
