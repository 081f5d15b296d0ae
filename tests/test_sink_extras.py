"""Wiring of the webhook/rabbitmq/nats sinks: configured or not, extra installed or not,
per-kind limits from the settings."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from tests.conftest import count_by_status, wait_until
from tests.tcp_proxy import free_port
from tests.test_cli import cli
from worker import logs
from worker.cli.app import build_sinks
from worker.cli.main import parse_args, settings_from
from worker.errors import ConfigError, PermanentError, TransientError
from worker.intent import Intent
from worker.producer import enqueue
from worker.settings import Settings
from worker.sinks.limits import LimitedSink
from worker.sinks.nats.sink import NatsSink
from worker.sinks.rabbitmq.sink import RabbitMQSink
from worker.sinks.registry import UnavailableSink
from worker.sinks.webhook.sink import WebhookSink
from worker.store.sqlfiles import Names


def _without(monkeypatch: pytest.MonkeyPatch, library: str, sink_module: str) -> None:
    """Make ``import library`` fail as if the extra were not installed."""
    monkeypatch.setitem(sys.modules, library, None)  # type: ignore[arg-type]
    monkeypatch.delitem(sys.modules, sink_module, raising=False)


def test_default_worker_has_webhooks_and_explains_unconfigured_brokers() -> None:
    sinks = build_sinks(Settings())
    assert isinstance(sinks["webhook"], WebhookSink)
    assert isinstance(sinks["rabbitmq"], UnavailableSink)
    assert sinks["rabbitmq"].reason == (
        "the rabbitmq kind is not configured in this worker: start it with --rabbitmq-url "
        "or OUTBOX_RABBITMQ_URL"
    )
    assert isinstance(sinks["nats"], UnavailableSink)


def test_configured_brokers_and_limits() -> None:
    settings = Settings(
        sink_options={
            "rabbitmq_url": "amqp://guest:guest@127.0.0.1:5672/",
            "nats_url": "nats://127.0.0.1:4222",
        },
        limits="nats:concurrency=2;webhook:rate=5/s",
    )
    sinks = build_sinks(settings)
    assert isinstance(sinks["rabbitmq"], RabbitMQSink)
    nats_sink = sinks["nats"]
    assert isinstance(nats_sink, LimitedSink) and isinstance(nats_sink.sink, NatsSink)
    assert isinstance(sinks["webhook"], LimitedSink)
    assert "guest:guest" not in repr(settings) and "guest" not in repr(sinks["rabbitmq"])


def test_configured_kind_with_missing_extra_stops_the_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _without(monkeypatch, "aio_pika", "worker.sinks.rabbitmq.sink")
    with pytest.raises(ConfigError, match=r"pip install 'pg-outbox-relay\[rabbitmq\]'"):
        build_sinks(Settings(sink_options={"rabbitmq_url": "amqp://guest:guest@127.0.0.1:5672/"}))
    _without(monkeypatch, "aiohttp", "worker.sinks.webhook.sink")
    with pytest.raises(ConfigError, match=r"needs the 'webhook' extra \(aiohttp is not"):
        build_sinks(Settings(sink_options={"webhook_secret": "s3cret"}))
    with pytest.raises(ConfigError, match=r"needs the 'webhook' extra"):
        build_sinks(Settings(sink_options={"webhook_allow_private": True}))


async def test_unconfigured_kind_with_missing_extra_is_a_dead_intent(
    monkeypatch: pytest.MonkeyPatch, db, names: Names, start_relay
) -> None:
    _without(monkeypatch, "aiohttp", "worker.sinks.webhook.sink")
    sinks = build_sinks(Settings())
    async with start_relay(sinks):
        async with db.transaction():
            intent_id = await enqueue(
                db, "webhook", {"url": "http://127.0.0.1:9/"}, schema=names.schema
            )
        await wait_until(lambda: _dead(db, names))
    error = await db.fetchval(
        f'SELECT last_error FROM "{names.schema}".intent WHERE id = $1', intent_id
    )
    assert error == (
        "the webhook kind needs the 'webhook' extra (aiohttp is not installed): "
        "pip install 'pg-outbox-relay[webhook]'"
    )
    for sink in sinks.values():
        await sink.aclose()


@pytest.mark.parametrize(
    ("argv", "env", "allowed"),
    [
        ([], None, False),
        (["--webhook-allow-private"], None, True),
        ([], "1", True),
        ([], "0", False),
    ],
)
async def test_webhook_allow_private_from_the_flag_or_the_variable(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], env: str | None, allowed: bool
) -> None:
    if env is not None:
        monkeypatch.setenv("OUTBOX_WEBHOOK_ALLOW_PRIVATE", env)
    sink = build_sinks(settings_from(parse_args(["run", *argv])))["webhook"]
    now = datetime.now(UTC)
    closed = Intent(1, "webhook", {"url": f"http://127.0.0.1:{free_port()}/"}, 1, 5, now, now)
    try:
        # Allowed, the worker tries to connect (nobody listens); refused, it never does.
        expected = (TransientError, "cannot connect") if allowed else (PermanentError, "loopback")
        with pytest.raises(expected[0], match=expected[1]):
            await sink.deliver(closed)
    finally:
        await sink.aclose()


async def test_unavailable_sink_is_permanent() -> None:
    with pytest.raises(PermanentError, match="not configured"):
        await UnavailableSink("not configured").deliver(None)  # type: ignore[arg-type]


def test_limits_for_a_kind_nobody_handles_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no sink or handler: sms"):
        build_sinks(replace(Settings(), limits="sms:rate=1/s"))


def test_cli_reports_bad_limits_in_one_line() -> None:
    result = cli("--dsn", "postgresql://x@127.0.0.1:1/x", "--limits", "email:rate=fast")
    assert result.returncode == 2, result.stderr
    assert "--limits email: rate='fast': expected N, N/s, N/min or N/h" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_never_shows_the_broker_password() -> None:
    result = cli(
        "--dsn",
        "postgresql://x@127.0.0.1:1/x",
        "--rabbitmq-url",
        "http://guest:hunter2-pw@127.0.0.1:5672/",
    )
    assert result.returncode == 2
    assert "--rabbitmq-url must start with amqp:// or amqps://" in result.stderr
    assert "hunter2-pw" not in result.stderr + result.stdout


async def _dead(db, names: Names) -> bool:
    return await count_by_status(db, names) == {"dead": 1}


def test_every_secret_url_is_masked_where_it_stands() -> None:
    """A URL's password, each of a NATS list's, in a line that quotes them; a webhook key is
    never printed at all (the settings' repr hides it)."""
    secrets = [f"pw-{n}-{os.urandom(4).hex()}" for n in range(4)]
    args = parse_args([
        "run",
        "--rabbitmq-url", f"amqp://app:{secrets[0]}@127.0.0.1/",
        "--nats-url", f"nats://a:{secrets[1]}@h1,nats://b:{secrets[2]}@h2",
        "--webhook-secret", secrets[3],
    ])  # fmt: skip
    settings = settings_from(args)
    options = settings.sink_options
    line = logs.redact_text(f"cannot reach {options['rabbitmq_url']} or {options['nats_url']}")
    assert line == "cannot reach amqp://app:***@127.0.0.1/ or nats://a:***@h1,nats://b:***@h2"
    assert not any(secret in repr(settings) for secret in secrets)
