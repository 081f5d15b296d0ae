"""The celery kind's message (protocol v2) and wiring, without a broker: compared with what
Celery itself builds for the same call (celery.app.amqp.as_task_v2)."""

from __future__ import annotations

import base64
import sys
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from celery import Celery

from tests.test_cli import cli
from worker.errors import ConfigError, PermanentError
from worker.intent import Intent
from worker.settings import Settings
from worker.sinks.celery import celery_sink
from worker.sinks.celery.amqp import CeleryAmqpSink
from worker.sinks.celery.message import TASK_ID_NAMESPACE, build_task, task_id
from worker.sinks.celery.redis import CeleryRedisSink, envelope, parse_redis_url
from worker.sinks.registry import UnavailableSink, build_sinks

CREATED = datetime(2026, 12, 4, 8, 0, 0, 250000, tzinfo=UTC)


def _intent(payload: Any, n: int = 7) -> Intent:
    return Intent(
        id=n, kind="celery", payload=payload, attempts=1, max_attempts=5, created_at=CREATED,
        run_at=CREATED,
    )  # fmt: skip


def test_the_task_id_is_the_documented_uuid5_of_prefix_and_intent_id() -> None:
    # The namespace docs/kinds/celery.md documents, spelled out: changing it breaks every consumer
    # that recomputes task ids.
    assert uuid.UUID("f9cae757-3d31-418a-a090-f8b8b95f7e1b") == TASK_ID_NAMESPACE
    assert task_id(42, "shop-") == str(uuid.uuid5(TASK_ID_NAMESPACE, "shop-42"))
    assert task_id(42) != task_id(43) != task_id(42, "shop-")
    again = build_task(_intent({"task": "t"}, n=42), "shop-")
    assert again.id == task_id(42, "shop-") == again.headers["id"] == again.headers["root_id"]


def test_the_message_is_the_one_celery_builds_for_the_same_call() -> None:
    args = [42, "héllo ✓", {"nested": [1, 2.5, None, True]}]
    kwargs = {"lang": "fr", "deep": {"a": ["ç"]}}  # Celery's repr stops at 3 levels
    payload = {"task": "myapp.tasks.send_welcome", "args": args, "kwargs": kwargs,
               "countdown": 60, "expires": 3600}  # fmt: skip
    ours = build_task(_intent(payload), "p-")
    theirs = Celery(set_as_current=False).amqp.as_task_v2(
        ours.id, "myapp.tasks.send_welcome", args=args, kwargs=kwargs, countdown=60,
        expires=3600, now=CREATED,
    )  # fmt: skip
    assert ours.headers == theirs.headers | {"origin": ours.headers["origin"]}
    assert ours.headers["origin"].startswith("outbox-worker@")
    assert ours.properties == theirs.properties
    assert orjson.loads(ours.body) == list(theirs.body)
    assert ours.headers["eta"] == (CREATED + timedelta(seconds=60)).isoformat()
    assert (ours.content_type, ours.content_encoding, ours.queue) == (
        "application/json", "utf-8", "celery"
    )  # fmt: skip


def test_eta_and_expires_as_dates_keep_their_offset() -> None:
    task = build_task(
        _intent({"task": "t", "eta": "2026-12-04T10:00:00+01:00", "expires": "2026-12-05T00:00Z"})
    )
    assert task.headers["eta"] == "2026-12-04T10:00:00+01:00"
    assert task.headers["expires"] == "2026-12-05T00:00:00+00:00"
    plain = build_task(_intent({"task": "t"}))
    assert plain.headers["eta"] is None and plain.headers["expires"] is None
    assert orjson.loads(plain.body) == [[], {}, {"callbacks": None, "errbacks": None,
                                                 "chain": None, "chord": None}]  # fmt: skip


def test_long_args_are_cut_in_argsrepr_only() -> None:
    task = build_task(_intent({"task": "t", "args": ["x" * 5000]}))
    assert len(task.headers["argsrepr"]) == 1024 and task.headers["argsrepr"].endswith("...")
    assert orjson.loads(task.body)[0] == ["x" * 5000]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([1], "celery payload must be a JSON object, got list"),
        ({"args": [1]}, "celery payload needs 'task'"),
        ({"task": " "}, "celery payload needs 'task'"),
        ({"task": "t", "args": {"a": 1}}, "celery 'args' must be a list"),
        ({"task": "t", "kwargs": [1]}, "celery 'kwargs' must be an object"),
        ({"task": "t", "queue": ""}, "celery 'queue' must be a non-empty string"),
        ({"task": "t", "queue": "q" * 256}, "at most 255 bytes"),
        ({"task": "t", "eta": "2026-12-04T10:00:00", "countdown": 5}, "both 'eta' and 'countdown'"),
        ({"task": "t", "eta": "2026-12-04T10:00:00"}, "'eta' must be an ISO 8601 date-time with"),
        ({"task": "t", "eta": 60}, "'eta' must be an ISO 8601 date-time"),
        ({"task": "t", "countdown": "60"}, "'countdown' must be a number of seconds"),
        ({"task": "t", "countdown": True}, "'countdown' must be a number of seconds"),
        ({"task": "t", "countdown": 1e300}, "'countdown' is out of range"),
        ({"task": "t", "expires": "tomorrow"}, "'expires' must be an ISO 8601 date-time"),
        ({"task": "t", "priority": 5}, "celery payload has unknown field(s): priority"),
    ],
)
def test_a_payload_celery_cannot_take_is_permanent(payload: Any, message: str) -> None:
    with pytest.raises(PermanentError) as e:
        build_task(_intent(payload))
    assert message in str(e.value)


def test_the_redis_envelope_is_kombus_layout() -> None:
    task = build_task(_intent({"task": "t", "args": ["é"], "queue": "emails"}))
    first, second = orjson.loads(envelope(task)), orjson.loads(envelope(task))
    assert set(first) == {"body", "content-encoding", "content-type", "headers", "properties"}
    assert base64.b64decode(first["body"]) == task.body
    assert first["headers"] == task.headers
    properties = first["properties"]
    assert properties["delivery_info"] == {"exchange": "", "routing_key": "emails"}
    assert properties | {"delivery_tag": "-"} == {
        "correlation_id": task.id, "reply_to": "", "delivery_mode": 2, "priority": 0,
        "body_encoding": "base64", "delivery_info": properties["delivery_info"],
        "delivery_tag": "-",
    }  # fmt: skip
    assert properties["delivery_tag"] != second["properties"]["delivery_tag"]  # one per push


def test_the_broker_url_picks_the_transport() -> None:
    assert isinstance(celery_sink("amqp://guest:guest@h:5672//", timeout=1), CeleryAmqpSink)
    assert isinstance(celery_sink("pyamqp://guest@h//", timeout=1), CeleryAmqpSink)
    assert isinstance(celery_sink("redis://:pw@h:6379/3", timeout=1), CeleryRedisSink)
    assert repr(celery_sink("redis://:pw@h/3", timeout=1)) == "CeleryRedisSink(h:6379/3)"
    for bad, message in [
        ("sqs://h", "must start with amqp://, amqps://, pyamqp://, redis:// or rediss://"),
        ("amqp:///vhost", "--celery-broker-url has no host"),
        ("redis://h:99999/0", "--celery-broker-url cannot be parsed"),
        ("redis://h/x", "the Redis database must be a number"),
    ]:
        with pytest.raises(ConfigError, match=message):
            celery_sink(bad, timeout=1)
    assert parse_redis_url("rediss://:s3cret@h:6380")[1] == "h:6380/0"


def test_the_kind_is_wired_only_when_configured() -> None:
    sinks = build_sinks(Settings(), {})
    assert isinstance(sinks["celery"], UnavailableSink)
    assert sinks["celery"].reason == (
        "the celery kind is not configured in this worker: start it with --celery-broker-url "
        "or OUTBOX_CELERY_BROKER_URL"
    )
    settings = Settings(sink_options={"celery_broker_url": "redis://:s3cret@127.0.0.1:6379/0"})
    sink = build_sinks(settings, {})["celery"]
    assert isinstance(sink, CeleryRedisSink)
    assert "s3cret" not in repr(settings) + repr(sink)


def test_a_configured_kind_without_its_extra_stops_the_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As if `pip install 'pg-outbox-relay[celery]'` had not been run: redis-py is missing.
    monkeypatch.setitem(sys.modules, "redis", None)  # type: ignore[arg-type]
    monkeypatch.delitem(sys.modules, "worker.sinks.celery.redis", raising=False)
    with pytest.raises(ConfigError) as e:
        build_sinks(Settings(sink_options={"celery_broker_url": "redis://127.0.0.1:6379/0"}), {})
    assert str(e.value) == (
        "the celery kind needs the 'celery' extra (redis is not installed): "
        "pip install 'pg-outbox-relay[celery]'"
    )


def test_cli_reports_a_bad_broker_url_in_one_line_without_the_password() -> None:
    result = cli(
        "--dsn", "postgresql://x@127.0.0.1:1/x",
        "--celery-broker-url", "sqs://key:hunter2-pw@queue.example/",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "--celery-broker-url must start with amqp://" in result.stderr
    assert "hunter2-pw" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
