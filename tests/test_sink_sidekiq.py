"""The sidekiq sink against the real Redis at 127.0.0.1:6379 (or OUTBOX_TEST_REDIS_URL).

Each test pushes to queues of its own (``t_<random>``), so tests never see each other's jobs;
"Redis down" is simulated with a TCP proxy so the machine's Redis stays up. The end-to-end
tests with a real Sidekiq server are in test_sidekiq_e2e.py.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
import redis.asyncio as redis

from tests import sidekiq_helpers
from tests.conftest import failed_at_least_once, statuses_are, wait_until
from tests.docs_text import doc_snippet
from tests.sidekiq_helpers import REDIS_URL, RedisDb, redis_or_skip
from tests.sink_helpers import (
    assert_outcomes,
    assert_unreachable_batch_fails_each_intent,
    assert_waiters_share_a_failed_connect,
)
from tests.tcp_proxy import TcpProxy, free_port
from tests.test_cli import cli
from tests.test_sink_extras import _without as without_extra
from worker.cli.app import build_sinks
from worker.errors import ConfigError, PermanentError, TransientError
from worker.intent import Intent
from worker.producer import enqueue
from worker.settings import Settings
from worker.sinks.base import BatchSink
from worker.sinks.registry import UnavailableSink
from worker.sinks.sidekiq.sink import SidekiqSink, build_job, job_id, parse_redis_url
from worker.store.sqlfiles import Names

redis_db = sidekiq_helpers.redis_db  # the fixture: an empty Redis database of the test's own


@dataclass
class Queues:
    """This test's view of Sidekiq's keys in Redis: its own queue names, prefix ``t_...``."""

    client: redis.Redis
    prefix: str

    def name(self, suffix: str = "default") -> str:
        return f"{self.prefix}{suffix}"

    async def jobs(self, suffix: str = "default") -> list[dict[str, Any]]:
        """The queue's jobs in the order the server will run them (it pops from the tail)."""
        raw = await self.client.lrange(f"queue:{self.name(suffix)}", 0, -1)
        return [orjson.loads(j) for j in reversed(raw)]

    async def scheduled(self) -> list[tuple[dict[str, Any], float]]:
        entries = await self.client.zrange("schedule", 0, -1, withscores=True)
        jobs = [(orjson.loads(member), score) for member, score in entries]
        return [(job, score) for job, score in jobs if job["queue"].startswith(self.prefix)]

    async def registered(self) -> set[str]:
        return {q.decode() for q in await self.client.smembers("queues")} & {
            self.name(s) for s in ("default", "a", "b", "low", "bad")
        }


@pytest.fixture
async def queues() -> AsyncIterator[Queues]:
    client = redis.Redis.from_url(redis_or_skip())
    target = Queues(client, f"t_{secrets.token_hex(4)}_")
    try:
        yield target
    finally:
        async for key in client.scan_iter(f"queue:{target.prefix}*"):
            await client.delete(key)
        for member in await client.zrange("schedule", 0, -1):
            if orjson.loads(member)["queue"].startswith(target.prefix):
                await client.zrem("schedule", member)
        names = [q.decode() for q in await client.smembers("queues")]
        mine = [q for q in names if q.startswith(target.prefix)]
        if mine:
            await client.srem("queues", *mine)
        await client.aclose()


@pytest.fixture
async def sink() -> AsyncIterator[SidekiqSink]:
    sidekiq_sink = SidekiqSink(redis_or_skip(), timeout=5)
    try:
        yield sidekiq_sink
    finally:
        await sidekiq_sink.aclose()


CREATED = datetime(2026, 12, 4, 8, 0, 0, 250000, tzinfo=UTC)


def _intent(payload: Any, n: int = 7) -> Intent:
    return Intent(
        id=n, kind="sidekiq", payload=payload, attempts=1, max_attempts=5, created_at=CREATED,
        run_at=CREATED,
    )  # fmt: skip


def _job(target: Queues, n: int, suffix: str = "default", **extra: Any) -> dict[str, Any]:
    return {"class": "WelcomeEmailJob", "args": [n], "queue": target.name(suffix), **extra}


# --- pure parts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([1], "payload must be a JSON object, got list"),
        ({"args": [1]}, "needs 'class'"),
        ({"class": "", "args": []}, "needs 'class'"),
        ({"class": 5, "args": []}, "needs 'class'"),
        ({"class": "welcome_email_job", "args": []}, "is not a Ruby class name"),
        ({"class": "Welcome Job", "args": []}, "is not a Ruby class name"),
        ({"class": "A"}, "needs 'args'"),
        ({"class": "A", "args": {"user_id": 1}}, "'args' must be a list, got dict"),
        ({"class": "A", "args": 1}, "'args' must be a list, got int"),
        ({"class": "A", "args": [], "queue": ""}, "'queue' must be a non-empty string"),
        ({"class": "A", "args": [], "retry": "yes"}, "'retry' must be true, false or a number"),
        ({"class": "A", "args": [], "retry": -1}, "'retry' must be true, false or a number"),
        ({"class": "A", "args": [], "at": "tomorrow"}, "'at' must be a number"),
        ({"class": "A", "args": [], "at": True}, "'at' must be a number"),
        ({"class": "A", "args": [], "at": 300}, "is not a time in epoch seconds"),
        ({"class": "A", "args": [], "tags": "a"}, "'tags' must be a list of strings"),
        ({"class": "A", "args": [], "retry_queue": 1}, "'retry_queue' must be a non-empty"),
        ({"class": "A", "args": [], "backtrace": "all"}, "'backtrace' must be true, false"),
        ({"class": "A", "args": [], "dead": 0}, "'dead' must be true or false"),
        ({"class": "A", "args": [], "jid": "abc"}, "jid are set by the worker"),
        ({"class": "A", "args": [], "wait": 5}, "unknown field(s): wait"),
    ],
)
def test_bad_payloads_are_permanent(payload: Any, message: str) -> None:
    with pytest.raises(PermanentError, match=r"^sidekiq ") as e:
        build_job(_intent(payload))
    assert message in str(e.value)


def test_the_job_hash_has_sidekiqs_defaults_and_a_derived_jid() -> None:
    job = build_job(_intent({"class": "Admin::WelcomeEmailJob", "args": [42, {"a": "é"}]}), "eu-")
    assert job.queue == "default" and job.at is None
    assert job.item == {
        "retry": True,
        "queue": "default",
        "class": "Admin::WelcomeEmailJob",
        "args": [42, {"a": "é"}],
        "jid": job_id(7, "eu-"),
        "created_at": CREATED.timestamp(),
    }
    # The documented derivation: SHA-256 of "<prefix><id>", first 24 hex digits.
    assert job_id(7, "eu-") == hashlib.sha256(b"eu-7").hexdigest()[:24]
    assert job_id(7) != job_id(7, "eu-") and len(job_id(7)) == 24


def test_optional_fields_are_kept() -> None:
    payload = {"class": "A", "args": [], "retry": 3, "tags": ["x"], "retry_queue": "low",
               "backtrace": 5, "dead": False, "at": 2_000_000_000}  # fmt: skip
    job = build_job(_intent(payload))
    assert job.at == 2_000_000_000.0 and "at" not in job.item
    assert {k: job.item[k] for k in ("retry", "tags", "retry_queue", "backtrace", "dead")} == {
        "retry": 3, "tags": ["x"], "retry_queue": "low", "backtrace": 5, "dead": False,
    }  # fmt: skip


def test_url_checks() -> None:
    assert parse_redis_url("redis://:pw@h:7000/3")[1] == "h:7000/3"
    assert parse_redis_url("rediss://h")[1] == "h:6379/0"
    with pytest.raises(ConfigError, match="must start with redis://"):
        parse_redis_url("http://h")
    with pytest.raises(ConfigError, match="no host"):
        parse_redis_url("redis://")
    with pytest.raises(ConfigError, match="the database must be a number"):
        parse_redis_url("redis://h/jobs")


def test_wiring_configured_or_not() -> None:
    sinks = build_sinks(Settings())
    assert isinstance(sinks["sidekiq"], UnavailableSink)
    assert "--sidekiq-redis-url or OUTBOX_SIDEKIQ_REDIS_URL" in sinks["sidekiq"].reason
    url = "redis://:hunter2-pw@127.0.0.1:6379/0"
    settings = Settings(sink_options={"sidekiq_redis_url": url})
    sidekiq_sink = build_sinks(settings)["sidekiq"]
    assert isinstance(sidekiq_sink, SidekiqSink)
    assert "hunter2" not in repr(sidekiq_sink) + repr(settings)


def test_configured_without_the_extra_stops_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    without_extra(monkeypatch, "redis", "worker.sinks.sidekiq.sink")
    with pytest.raises(ConfigError, match=r"pip install 'pg-outbox-relay\[sidekiq\]'"):
        build_sinks(Settings(sink_options={"sidekiq_redis_url": "redis://127.0.0.1:6379/0"}))


def test_cli_reports_a_bad_url_in_one_line_without_the_password() -> None:
    result = cli(
        "--dsn", "postgresql://x@127.0.0.1:1/x", "--sidekiq-redis-url", "http://:hunter2-pw@h/0"
    )
    assert result.returncode == 2
    assert "--sidekiq-redis-url must start with redis:// or rediss://" in result.stderr
    assert "hunter2-pw" not in result.stderr + result.stdout


# --- against Redis ---------------------------------------------------------------------------


async def test_a_job_is_pushed_as_sidekiqs_client_pushes_it(
    sink: SidekiqSink, queues: Queues
) -> None:
    before = time.time()
    await sink.deliver(_intent(_job(queues, 42), n=41))
    [job] = await queues.jobs()
    assert await queues.registered() == {queues.name()}
    assert job.pop("enqueued_at") >= before
    assert job == {
        "retry": True, "queue": queues.name(), "class": "WelcomeEmailJob", "args": [42],
        "jid": job_id(41), "created_at": CREATED.timestamp(),
    }  # fmt: skip
    assert isinstance(job["created_at"], float)


TRACE = {
    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "tracestate": "vendor=1",
}


async def test_the_trace_context_is_in_the_jobs_top_level_fields(
    sink: SidekiqSink, queues: Queues
) -> None:
    traced = replace(_intent(_job(queues, 1), n=1), trace_context=TRACE)
    assert await sink.deliver_many([traced, _intent(_job(queues, 2), n=2)]) == [None, None]
    first, second = await queues.jobs()
    assert (first["traceparent"], first["tracestate"]) == (TRACE["traceparent"], "vendor=1")
    assert "traceparent" not in second and "tracestate" not in second


async def test_a_future_at_goes_to_the_schedule_set_a_past_one_to_the_queue(
    sink: SidekiqSink, queues: Queues
) -> None:
    at = time.time() + 3600
    await sink.deliver(_intent(_job(queues, 1, at=at), n=1))
    await sink.deliver(_intent(_job(queues, 2, at=time.time() - 60), n=2))
    [(scheduled, score)] = await queues.scheduled()
    assert score == pytest.approx(at) and "enqueued_at" not in scheduled
    assert scheduled["jid"] == job_id(1) and "at" not in scheduled
    assert [j["jid"] for j in await queues.jobs()] == [job_id(2)]
    # A repeated push of a scheduled job writes the same member: still one entry.
    await sink.deliver(_intent(_job(queues, 1, at=at), n=1))
    assert len(await queues.scheduled()) == 1


async def test_a_mixed_batch_is_one_transaction_with_one_outcome_per_intent(
    sink: SidekiqSink, queues: Queues
) -> None:
    assert isinstance(sink, BatchSink)
    await queues.client.set(f"queue:{queues.name('bad')}", "not a list")
    at = time.time() + 3600
    batch = [
        _intent(_job(queues, 1, "a"), n=1),
        _intent(_job(queues, 2, "b"), n=2),
        _intent({"class": "A", "args": 3}, n=3),
        _intent(_job(queues, 4, "bad"), n=4),
        _intent(_job(queues, 5, "a", at=at), n=5),
        _intent(_job(queues, 6, "a"), n=6),
    ]
    assert_outcomes(
        await sink.deliver_many(batch),
        [
            None,
            None,
            (PermanentError, "'args' must be a list"),
            (TransientError, "WRONGTYPE"),
            None,
            None,
        ],
    )
    assert [j["jid"] for j in await queues.jobs("a")] == [job_id(1), job_id(6)]
    assert [j["jid"] for j in await queues.jobs("b")] == [job_id(2)]
    assert [j["jid"] for j, _ in await queues.scheduled()] == [job_id(5)]
    assert await queues.registered() == {queues.name(s) for s in ("a", "b", "bad")}


async def test_a_full_batch_keeps_its_order(sink: SidekiqSink, queues: Queues) -> None:
    batch = [_intent(_job(queues, n), n=n) for n in range(1, sink.max_batch + 1)]
    assert_outcomes(await sink.deliver_many(batch), [None] * len(batch))
    jobs = await queues.jobs()
    assert [j["jid"] for j in jobs] == [job_id(n) for n in range(1, sink.max_batch + 1)]
    assert len({j["enqueued_at"] for j in jobs}) == 1  # one push, as push_bulk does


async def test_unreachable_redis_is_transient_and_the_password_is_never_shown() -> None:
    sidekiq_sink = SidekiqSink(f"redis://:sekrit-pw@127.0.0.1:{free_port()}/0", timeout=1)
    try:
        with pytest.raises(TransientError, match="cannot connect") as e:
            await sidekiq_sink.deliver(_intent({"class": "A", "args": []}))
    finally:
        await sidekiq_sink.aclose()
    assert "sekrit-pw" not in str(e.value)


async def test_a_refused_login_is_transient_and_the_password_is_not_shown() -> None:
    parts = urlsplit(redis_or_skip())
    # No such ACL user: Redis answers WRONGPASS whether or not it has a password set.
    url = f"redis://outbox-nobody:sekrit-pw@{parts.hostname}:{parts.port or 6379}/0"
    sidekiq_sink = SidekiqSink(url, timeout=2)
    try:
        with pytest.raises(TransientError, match="cannot connect: AuthenticationError") as e:
            await sidekiq_sink.deliver(_intent({"class": "A", "args": []}))
    finally:
        await sidekiq_sink.aclose()
    assert "sekrit-pw" not in str(e.value)


async def test_waiting_deliveries_share_a_failed_connect() -> None:
    sidekiq_sink = SidekiqSink(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    await assert_waiters_share_a_failed_connect(
        sidekiq_sink, lambda n: _intent({"class": "A", "args": []}, n=n)
    )


async def test_a_batch_to_an_unreachable_redis_fails_each_intent() -> None:
    await assert_unreachable_batch_fails_each_intent(
        SidekiqSink(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5),
        lambda n: _intent({"class": "A", "args": []}, n=n),
        _intent({"class": "A"}, n=9),
    )


async def test_a_frozen_redis_times_out_as_transient_then_recovers(queues: Queues) -> None:
    parts = urlsplit(REDIS_URL)
    async with TcpProxy("127.0.0.1", parts.port or 6379) as proxy:
        sidekiq_sink = SidekiqSink(f"redis://127.0.0.1:{proxy.port}/0", timeout=1)
        try:
            await sidekiq_sink.deliver(_intent(_job(queues, 1), n=1))
            proxy.freeze()
            with pytest.raises(TransientError, match="no reply within 1s"):
                await sidekiq_sink.deliver(_intent(_job(queues, 2), n=2))
            proxy.cut()
            proxy.heal()
            await sidekiq_sink.deliver(_intent(_job(queues, 3), n=3))
        finally:
            await sidekiq_sink.aclose()
    # Job 2 may or may not have reached Redis before the freeze; 1 and 3 surely did.
    jids = [j["jid"] for j in await queues.jobs()]
    assert jids[0] == job_id(1) and jids[-1] == job_id(3) and len(jids) in (2, 3)


async def test_relay_redis_down_then_back_loses_nothing(
    db, names: Names, start_relay, queues: Queues
) -> None:
    parts = urlsplit(REDIS_URL)
    async with TcpProxy("127.0.0.1", parts.port or 6379) as proxy:
        sidekiq_sink = SidekiqSink(f"redis://127.0.0.1:{proxy.port}/0", timeout=1)
        try:
            async with start_relay({"sidekiq": sidekiq_sink}, backoff_base=0.1, backoff_max=0.5):
                async with db.transaction():
                    for n in range(10):
                        await enqueue(db, "sidekiq", _job(queues, n), schema=names.schema)
                await wait_until(lambda: statuses_are(db, names, {"sent": 10}))
                await proxy.stop()
                async with db.transaction():
                    for n in range(10, 20):
                        await enqueue(db, "sidekiq", _job(queues, n), schema=names.schema)
                await wait_until(lambda: failed_at_least_once(db, names, 10))
                await proxy.start()
                await wait_until(lambda: statuses_are(db, names, {"sent": 20}), timeout=30)
        finally:
            await sidekiq_sink.aclose()
    ids = [r["id"] for r in await db.fetch(f'SELECT id FROM "{names.schema}".intent')]
    jobs = await queues.jobs()
    # Nothing reached Redis while it was down, so each job is there exactly once.
    assert sorted(j["jid"] for j in jobs) == sorted(job_id(i) for i in ids)
    assert sorted(j["args"][0] for j in jobs) == list(range(20))


async def test_the_documented_sql_snippet_pushes_both_jobs(
    db, names: Names, start_relay, redis_db: RedisDb
) -> None:
    sql = doc_snippet("kinds/sidekiq.md", "Payload", "sql").text
    await db.execute(sql.replace("outbox.", f'"{names.schema}".'))
    sidekiq_sink = SidekiqSink(redis_db.url)
    try:
        async with start_relay({"sidekiq": sidekiq_sink}):
            await wait_until(lambda: statuses_are(db, names, {"sent": 2}))
    finally:
        await sidekiq_sink.aclose()
    ids = [r["id"] for r in await db.fetch(f'SELECT id FROM "{names.schema}".intent ORDER BY id')]
    [welcome] = [orjson.loads(j) for j in await redis_db.client.lrange("queue:default", 0, -1)]
    assert (welcome["class"], welcome["args"], welcome["jid"]) == (
        "WelcomeEmailJob",
        [42],
        job_id(ids[0]),
    )
    # The second one is scheduled, unless its time has come already.
    mailers = await redis_db.client.lrange("queue:mailers", 0, -1)
    scheduled = await redis_db.client.zrange("schedule", 0, -1)
    [trial] = [orjson.loads(j) for j in mailers + scheduled]
    assert (trial["class"], trial["retry"], trial["jid"]) == (
        "Billing::TrialEndsJob",
        5,
        job_id(ids[1]),
    )
    registered = {b"default", b"mailers"} if mailers else {b"default"}
    assert await redis_db.client.smembers("queues") == registered
