"""Big payloads (issue 14): each sink checks the bytes it is about to send against its limit.

Against the real servers: over the limit the intent is dead with a reason naming both sizes
and the receiver saw nothing of it; under it a big payload is delivered; the other intents
of the same batch are delivered either way.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import pytest
import redis.asyncio as redis
from aiohttp import web

from tests.conftest import statuses_are, wait_until
from tests.sidekiq_helpers import redis_or_skip
from tests.smtp_server import SmtpTestServer
from tests.test_sink_nats import Stream, stream  # noqa: F401 - fixture
from tests.test_sink_rabbitmq import Broker, broker  # noqa: F401 - fixture
from worker.cli.app import build_sinks
from worker.errors import ConfigError, PermanentError
from worker.intent import Intent
from worker.producer import enqueue
from worker.settings import Settings
from worker.sinks.amqp import _server_version
from worker.sinks.celery.redis import CeleryRedisSink
from worker.sinks.email import EmailSink, parse_smtp_url
from worker.sinks.limits import parse_limits
from worker.sinks.nats.sink import NatsSink
from worker.sinks.rabbitmq.sink import RabbitMQSink
from worker.sinks.sidekiq.sink import SidekiqSink
from worker.sinks.size import MIB, SizeLimit, format_bytes, parse_size, rabbitmq_default
from worker.store.sqlfiles import Names

BIG = 20 * 1000 * 1000  # the 20 MB payload


# --- the limit itself (pure) ---------------------------------------------------------------


def test_sizes_parse_in_bytes_and_binary_or_decimal_units() -> None:
    assert parse_size("webhook", "1048576") == MIB
    assert parse_size("webhook", "512KiB") == 512 * 1024
    assert parse_size("webhook", "20MB") == BIG
    assert parse_size("webhook", "1.5 GiB") == 3 * 512 * MIB
    for bad in ("", "ten", "5 parsecs", "0", "-1MB"):
        with pytest.raises(ConfigError, match="max_bytes"):
            parse_size("webhook", bad)
    assert parse_limits("webhook:max_bytes=32MiB")["webhook"].max_bytes == 32 * MIB


def test_the_limit_is_the_cap_the_server_or_the_default_whichever_applies() -> None:
    limit = SizeLimit("nats", None, MIB)
    assert limit.limit(8 * MIB, "max_payload") == (8 * MIB, "max_payload")
    assert limit.limit()[0] == MIB
    capped = SizeLimit("nats", 2 * MIB, MIB)
    assert capped.limit(8 * MIB, "max_payload") == (2 * MIB, "--limits nats:max_bytes")
    assert capped.limit(MIB, "max_payload") == (MIB, "max_payload")  # never above the server's
    with pytest.raises(PermanentError) as caught:
        capped.check("nats message", BIG)
    assert str(caught.value) == (
        "nats message of 20,000,000 bytes (19.1 MiB) is larger than the limit of "
        "2,097,152 bytes (2 MiB), --limits nats:max_bytes; nothing was sent"
    )
    assert format_bytes(100) == "100 bytes"
    assert rabbitmq_default("3.10.8") == 128 * MIB
    assert rabbitmq_default("4.0.2") == 16 * MIB


def test_max_bytes_for_a_handler_kind_is_refused_at_start_up(settings: Settings) -> None:
    with pytest.raises(ConfigError, match="max_bytes applies to the built-in sinks"):
        build_sinks(
            replace(
                settings,
                handlers="tests.sample_handlers:handlers",
                limits="noop:max_bytes=1MB",
            )
        )


# --- webhook: an aiohttp receiver ------------------------------------------------------------


class BigReceiver:
    """Records the size of every request body; takes bodies up to 64 MiB."""

    def __init__(self) -> None:
        self.bodies: list[int] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.bodies.append(len(await request.read()))
        return web.Response(text="ok")

    async def __aenter__(self) -> BigReceiver:
        app = web.Application(client_max_size=64 * MIB)
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


@pytest.mark.parametrize(
    ("limits", "big_status"), [(None, "dead"), ("webhook:max_bytes=32MiB", "sent")]
)
async def test_webhook_refuses_a_body_over_its_cap_and_sends_one_under_it(
    db: asyncpg.Connection, names: Names, settings: Settings, start_relay: Any,
    limits: str | None, big_status: str,
) -> None:  # fmt: skip
    bodies = [{"tag": "small"}, {"tag": "big", "blob": "x" * BIG}, {"tag": "after"}]
    sizes = [len(orjson.dumps(body)) for body in bodies]
    async with BigReceiver() as receiver:
        url = f"http://127.0.0.1:{receiver.port}/hook"
        for body in bodies:
            await enqueue(db, "webhook", {"url": url, "body": body}, schema=names.schema)
        # Allowed by name: loopback targets may be refused by default.
        sinks = allowed = {"webhook_allow_hosts": "127.0.0.1"}
        sinks = build_sinks(replace(settings, limits=limits, sink_options=allowed))
        try:
            async with start_relay({"webhook": sinks["webhook"]}):
                expected = {"sent": 3} if big_status == "sent" else {"sent": 2, "dead": 1}
                await wait_until(lambda: statuses_are(db, names, expected), timeout=60)
        finally:
            for sink in sinks.values():
                await sink.aclose()
        rows = await db.fetch(f'SELECT status, last_error FROM "{names.schema}".intent ORDER BY id')
    assert [r["status"] for r in rows] == ["sent", big_status, "sent"]
    if big_status == "dead":
        assert rows[1]["last_error"] == (
            f"POST http://127.0.0.1:{receiver.port}: request body of {sizes[1]:,} bytes "
            "(19.1 MiB) is larger than the limit of 10,485,760 bytes (10 MiB), the webhook "
            "default (--limits webhook:max_bytes raises it); nothing was sent"
        )
        assert sorted(receiver.bodies) == sorted([sizes[0], sizes[2]])  # none of the big one
    else:
        assert sorted(receiver.bodies) == sorted(sizes)


# --- email: the SMTP server's SIZE ------------------------------------------------------------


async def _email_batch(db: asyncpg.Connection, names: Names) -> None:
    for tag, size in (("small", 10), ("big", BIG), ("medium", 2 * 1000 * 1000)):
        payload = {"to": f"{tag}@example.com", "subject": tag, "text": "x" * size}
        await enqueue(db, "email", payload, schema=names.schema)


async def test_email_over_the_servers_size_is_dead_before_mail_from(
    db: asyncpg.Connection, names: Names, start_relay: Any
) -> None:
    async with SmtpTestServer(size_limit=8 * MIB) as server:
        sink = EmailSink(parse_smtp_url(server.url(helo="client.test")), "outbox@example.com", 4)
        await _email_batch(db, names)
        try:
            async with start_relay({"email": sink}):
                await wait_until(lambda: statuses_are(db, names, {"sent": 2, "dead": 1}), 60)
        finally:
            await sink.aclose()
        dead = await db.fetchval(
            f"SELECT last_error FROM \"{names.schema}\".intent WHERE status = 'dead'"
        )
        assert dead.startswith("email message of 2")
        assert dead.endswith(
            "is larger than the limit of 8,388,608 bytes (8 MiB), the SMTP server's SIZE; "
            "nothing was sent"
        )
        # The big one was never offered: no MAIL FROM for it, nothing received.
        assert server.transactions == 2
        assert sorted(m.rcpt_tos[0] for m in server.accepted) == [
            "medium@example.com",
            "small@example.com",
        ]


async def test_a_20_mb_email_goes_out_when_the_server_takes_it(
    db: asyncpg.Connection, names: Names, start_relay: Any
) -> None:
    async with SmtpTestServer() as server:  # aiosmtpd announces SIZE 33554432
        sink = EmailSink(parse_smtp_url(server.url(helo="client.test")), "outbox@example.com", 4)
        await _email_batch(db, names)
        try:
            async with start_relay({"email": sink}):
                await wait_until(lambda: statuses_are(db, names, {"sent": 3}), 60)
        finally:
            await sink.aclose()
        big = [m for m in server.accepted if m.rcpt_tos == ("big@example.com",)]
        assert len(big) == 1 and len(big[0].data) > BIG


# --- nats: the server's max_payload (1 MiB here) ----------------------------------------------


async def test_nats_over_max_payload_is_dead_and_the_connection_stays_up(
    db: asyncpg.Connection, names: Names, start_relay: Any, nats_url: str,
    stream: Stream,  # noqa: F811
) -> None:  # fmt: skip
    subject = f"{stream.prefix}.blobs"
    sizes = {"small": 10, "big": BIG, "just-over": 1024 * 1024, "under": 900 * 1000, "last": 10}
    for tag, size in sizes.items():
        await enqueue(db, "nats", {"subject": subject, "body": {tag: "x" * size}},
                      schema=names.schema)  # fmt: skip
    sink = NatsSink(nats_url, timeout=10)
    try:
        async with start_relay({"nats": sink}, concurrency=8):
            await wait_until(lambda: statuses_are(db, names, {"sent": 3, "dead": 2}), 60)
    finally:
        await sink.aclose()
    dead = await db.fetch(
        f"SELECT last_error FROM \"{names.schema}\".intent WHERE status = 'dead' ORDER BY id"
    )
    for row in dead:
        assert row["last_error"].startswith(f"nats message to {subject!r} of ")
        assert row["last_error"].endswith(
            "is larger than the limit of 1,048,576 bytes (1 MiB), the server's max_payload; "
            "nothing was sent"
        )
    got = sorted(len(m.data) for m in await stream.messages())
    assert got == [len('{"last":"xxxxxxxxxx"}'), len('{"small":"xxxxxxxxxx"}'), 900_000 + 12]


# --- rabbitmq, sidekiq, celery on Redis: one batch each ---------------------------------------


def _intent(n: int, kind: str, payload: Any) -> Intent:
    now = datetime.now(UTC)
    return Intent(n, kind, payload, 1, 5, now, now)


async def test_rabbitmq_checks_the_body_against_the_brokers_default_or_the_cap(
    amqp_url: str,
    broker: Broker,  # noqa: F811
) -> None:
    def event(n: int, size: int) -> Intent:
        body = {"blob": "x" * size}
        return _intent(n, "rabbitmq", {"exchange": broker.exchange, "routing_key": "order.x",
                                       "body": body})  # fmt: skip

    # The default comes from the broker's version, read off the connection.
    version = _server_version(broker.connection)
    assert version is not None and re.match(r"^\d+\.\d+", version), version
    batch = [event(1, 10), event(2, BIG), event(3, 10)]
    default = RabbitMQSink(amqp_url, timeout=30)  # RabbitMQ 3.8-3.13: 128 MiB
    capped = RabbitMQSink(amqp_url, timeout=30, max_bytes=MIB)
    try:
        assert await default.deliver_many(batch) == [None, None, None]
        results = await capped.deliver_many(batch)
    finally:
        await default.aclose()
        await capped.aclose()
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], PermanentError)
    assert str(results[1]) == (
        f"rabbitmq message body to {broker.exchange!r} of 20,000,011 bytes (19.1 MiB) is larger "
        "than the limit of 1,048,576 bytes (1 MiB), --limits rabbitmq:max_bytes; nothing was sent"
    )
    sizes = sorted(len(m.body) for m in await broker.messages())
    assert sizes == [21, 21, 21, 21, 20_000_011]  # the big one once: from the uncapped sink


async def test_redis_kinds_refuse_a_job_over_their_cap_and_push_the_rest() -> None:
    url = redis_or_skip()
    prefix = f"t_{secrets.token_hex(4)}_"
    client = redis.Redis.from_url(url)
    sidekiq = SidekiqSink(url, timeout=10, max_bytes=MIB)
    celery = CeleryRedisSink(url, timeout=10, max_bytes=MIB)
    try:
        jobs = [
            _intent(n, "sidekiq", {"class": "BlobJob", "args": ["x" * size], "queue": prefix})
            for n, size in ((1, 10), (2, BIG), (3, 500 * 1000))
        ]
        sent = await sidekiq.deliver_many(jobs)
        tasks = [
            _intent(n, "celery", {"task": "t.blob", "args": ["x" * size], "queue": f"{prefix}c"})
            for n, size in ((1, 10), (2, BIG), (3, 500 * 1000))
        ]
        pushed = await celery.deliver_many(tasks)
        assert await client.llen(f"queue:{prefix}") == 2
        assert await client.llen(f"{prefix}c") == 2
    finally:
        await client.delete(f"queue:{prefix}", f"{prefix}c")
        await client.srem("queues", prefix)
        await client.aclose()
        await sidekiq.aclose()
        await celery.aclose()
    for results, what in ((sent, "sidekiq job BlobJob"), (pushed, "celery message for queue")):
        assert results[0] is None and results[2] is None
        assert isinstance(results[1], PermanentError)
        assert str(results[1]).startswith(f"{what}")
        assert "is larger than the limit of 1,048,576 bytes (1 MiB)" in str(results[1])


async def test_the_default_redis_cap_lets_a_20_mb_job_through() -> None:
    url = redis_or_skip()
    queue = f"t_{secrets.token_hex(4)}_"
    sink = SidekiqSink(url, timeout=30)
    client = redis.Redis.from_url(url)
    try:
        job = _intent(1, "sidekiq", {"class": "BlobJob", "args": ["x" * BIG], "queue": queue})
        assert await sink.deliver_many([job]) == [None]
        assert len(await client.lindex(f"queue:{queue}", 0)) > BIG
    finally:
        await client.delete(f"queue:{queue}")
        await client.srem("queues", queue)
        await client.aclose()
        await sink.aclose()
