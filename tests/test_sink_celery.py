"""The celery kind end to end: a real, unmodified Celery worker (tests/celery_app.py, in a
subprocess) runs what the relay pushes through RabbitMQ and through Redis.

Every test runs once per broker, on a queue of its own. "Broker down" is a TCP proxy
between the sink and the broker; the Celery worker talks to the broker directly.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import orjson
import pytest

from tests.celery_worker import (
    CeleryWorker,
    broker_url,
    forget_queue,
    queue_name,
    running_worker,
)
from tests.conftest import failed_at_least_once, statuses_are, wait_until
from tests.sink_helpers import (
    assert_unreachable_batch_fails_each_intent,
    assert_waiters_share_a_failed_connect,
)
from tests.tcp_proxy import TcpProxy, free_port
from worker.errors import TransientError
from worker.intent import Intent
from worker.producer import enqueue
from worker.sinks.celery import celery_sink
from worker.store.sqlfiles import Names

NAMESPACE = uuid.UUID("f9cae757-3d31-418a-a090-f8b8b95f7e1b")  # docs/kinds/celery.md documents it
UNICODE = "héllo wörld ✓ 😀 \u202e \t\"'\\"
NESTED = {"list": [1, 2.5, None, True, "ç"], "empty": {}, "deep": {"a": [{"b": [[]]}]}}


@pytest.fixture(params=["amqp", "redis"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def worker(transport: str, tmp_path: Path) -> AsyncIterator[CeleryWorker]:
    async with running_worker(transport, tmp_path) as celery:
        yield celery


def _record(worker: CeleryWorker, n: int, **extra: Any) -> dict[str, Any]:
    return {"task": "tests.record", "queue": worker.queue, "args": [n], **extra}


def _rich(worker: CeleryWorker, n: int) -> dict[str, Any]:
    return _record(worker, n, args=[n, UNICODE, NESTED], kwargs={"k": UNICODE, "n": NESTED})


async def _ids(db: Any, names: Names) -> list[int]:
    return [r["id"] for r in await db.fetch(f'SELECT id FROM "{names.schema}".intent')]


async def test_a_real_worker_runs_every_pushed_task_with_its_arguments(
    db, names: Names, start_relay, worker: CeleryWorker
) -> None:
    sink = celery_sink(worker.url, timeout=10, id_prefix="shop-")
    try:
        async with start_relay({"celery": sink}):
            async with db.transaction():
                ids = [
                    await enqueue(db, "celery", _rich(worker, n), schema=names.schema)
                    for n in range(20)
                ]
            await wait_until(lambda: statuses_are(db, names, {"sent": 20}))
    finally:
        await sink.aclose()
    runs = await worker.ran(20)
    assert sorted(r["args"][0] for r in runs) == list(range(20))
    for run in runs:
        assert run["task"] == "tests.record"
        assert run["args"][1:] == [UNICODE, NESTED] and run["kwargs"] == {"k": UNICODE, "n": NESTED}
        intent_id = ids[run["args"][0]]
        assert run["id"] == str(uuid.uuid5(NAMESPACE, f"shop-{intent_id}"))


async def test_countdown_eta_and_expires_are_honoured(
    db, names: Names, start_relay, worker: CeleryWorker
) -> None:
    soon = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
    sink = celery_sink(worker.url, timeout=10)
    try:
        async with start_relay({"celery": sink}):
            async with db.transaction():
                expired = await enqueue(
                    db, "celery", _record(worker, 0, expires=-60), schema=names.schema
                )
                countdown = await enqueue(
                    db, "celery", _record(worker, 1, countdown=2), schema=names.schema
                )
                at = await enqueue(db, "celery", _record(worker, 2, eta=soon), schema=names.schema)
            await wait_until(lambda: statuses_are(db, names, {"sent": 3}))
    finally:
        await sink.aclose()
    runs = {r["args"][0]: r for r in await worker.ran(2)}
    created = {
        r["id"]: r["created_at"]
        for r in await db.fetch(f'SELECT id, created_at FROM "{names.schema}".intent')
    }  # fmt: skip
    due = created[countdown] + timedelta(seconds=2)
    assert datetime.fromisoformat(runs[1]["eta"]) == due  # counted from the commit
    # Not before it was due (50 ms for the worker's timer, against a 2 s countdown).
    assert runs[1]["ran_at"] >= due.timestamp() - 0.05
    assert datetime.fromisoformat(runs[2]["eta"]) == datetime.fromisoformat(soon)
    assert runs[2]["ran_at"] >= datetime.fromisoformat(soon).timestamp() - 0.05
    # The expired task reached the worker first (one queue, in order) and was not run.
    assert 0 not in runs and str(uuid.uuid5(NAMESPACE, str(expired))) in worker.log_text()
    assert at != countdown


async def test_payload_errors_are_dead_with_the_reason_and_the_others_run(
    db, names: Names, start_relay, worker: CeleryWorker
) -> None:
    bad = {
        "no task": {"args": [1], "queue": worker.queue},
        "args not a list": _record(worker, 0) | {"args": {"user": 1}},
        "naive eta": _record(worker, 0, eta="2026-12-04T10:00:00"),
        "both eta and countdown": _record(worker, 0, eta="2026-12-04T10:00:00Z", countdown=1),
    }
    sink = celery_sink(worker.url, timeout=10)
    try:
        async with start_relay({"celery": sink}, concurrency=8):
            async with db.transaction():
                dead = {
                    what: await enqueue(db, "celery", payload, schema=names.schema)
                    for what, payload in bad.items()
                }
                for n in range(1, 11):
                    await enqueue(db, "celery", _record(worker, n), schema=names.schema)
            await wait_until(lambda: statuses_are(db, names, {"sent": 10, "dead": 4}))
    finally:
        await sink.aclose()
    rows = await db.fetch(
        f'SELECT id, last_error FROM "{names.schema}".intent WHERE status = $1', "dead"
    )
    reasons = {r["id"]: r["last_error"] for r in rows}
    assert (
        reasons[dead["no task"]]
        == "celery payload needs 'task', the task's name (a non-empty string)"
    )
    assert reasons[dead["args not a list"]] == "celery 'args' must be a list"
    assert reasons[dead["naive eta"]].startswith(
        "celery 'eta' must be an ISO 8601 date-time with a UTC offset"
    )
    assert (
        reasons[dead["both eta and countdown"]]
        == "celery payload has both 'eta' and 'countdown': give one"
    )
    assert sorted(r["args"][0] for r in await worker.ran(10)) == list(range(1, 11))


async def test_a_broker_outage_is_retried_and_nothing_is_lost(
    db, names: Names, start_relay, worker: CeleryWorker, transport: str
) -> None:
    port = urlsplit(worker.url).port or (5672 if transport == "amqp" else 6379)
    async with TcpProxy("127.0.0.1", port) as proxy:
        sink = celery_sink(proxy.rewrite(worker.url), timeout=5)
        try:
            async with start_relay({"celery": sink}, backoff_base=0.1, backoff_max=0.5):
                async with db.transaction():
                    for n in range(10):
                        await enqueue(db, "celery", _record(worker, n), schema=names.schema)
                await wait_until(lambda: statuses_are(db, names, {"sent": 10}))
                await proxy.stop()
                async with db.transaction():
                    for n in range(10, 20):
                        await enqueue(db, "celery", _record(worker, n), schema=names.schema)
                await wait_until(lambda: failed_at_least_once(db, names, 10))
                await proxy.start()
                await wait_until(lambda: statuses_are(db, names, {"sent": 20}), timeout=60)
        finally:
            await sink.aclose()
    await worker.ran(20)
    expected = {str(uuid.uuid5(NAMESPACE, str(i))) for i in await _ids(db, names)}
    assert set(worker.ids()) == expected  # a duplicate run is allowed, a lost one is not


async def test_connection_lost_mid_stream_is_retried(
    db, names: Names, start_relay, worker: CeleryWorker, transport: str
) -> None:
    port = urlsplit(worker.url).port or (5672 if transport == "amqp" else 6379)
    async with TcpProxy("127.0.0.1", port) as proxy:
        sink = celery_sink(proxy.rewrite(worker.url), timeout=5)
        try:
            async with start_relay({"celery": sink}, backoff_base=0.05, backoff_max=0.3):
                async with db.transaction():
                    for n in range(300):
                        await enqueue(db, "celery", _record(worker, n), schema=names.schema)
                await wait_until(lambda: _sent_at_least(db, names, 1))
                proxy.cut()  # every connection reset, mid-stream
                await wait_until(lambda: statuses_are(db, names, {"sent": 300}), timeout=60)
        finally:
            await sink.aclose()
    await worker.ran(300)
    expected = {str(uuid.uuid5(NAMESPACE, str(i))) for i in await _ids(db, names)}
    assert set(worker.ids()) == expected


async def _sent_at_least(db: Any, names: Names, n: int) -> bool:
    sent = await db.fetchval(
        f'SELECT count(*) FROM "{names.schema}".intent WHERE status = $1', "sent"
    )
    return bool(sent >= n)


def _intent(n: int, payload: Any) -> Intent:
    now = datetime.now(UTC)
    return Intent(
        id=n, kind="celery", payload=payload, attempts=1, max_attempts=5, created_at=now, run_at=now
    )


def _unreachable(transport: str) -> str:
    scheme = "amqp://guest:guest" if transport == "amqp" else "redis://"
    return (
        f"{scheme}@127.0.0.1:{free_port()}/"
        if transport == "amqp"
        else f"{scheme}127.0.0.1:{free_port()}/0"
    )


async def test_waiting_deliveries_share_a_failed_connect(transport: str) -> None:
    sink = celery_sink(_unreachable(transport), timeout=5)
    await assert_waiters_share_a_failed_connect(sink, lambda n: _intent(n, {"task": "t"}))


async def test_a_batch_to_an_unreachable_broker_fails_each_intent(transport: str) -> None:
    await assert_unreachable_batch_fails_each_intent(
        celery_sink(_unreachable(transport), timeout=5),
        lambda n: _intent(n, {"task": "t"}),
        _intent(9, {"task": 1}),
    )


async def test_a_queue_no_worker_declared_yet_is_retried_on_rabbitmq() -> None:
    url = broker_url("amqp")
    sink = celery_sink(url, timeout=10)
    try:
        with pytest.raises(TransientError) as e:
            await sink.deliver(_intent(1, {"task": "t", "queue": queue_name()}))
    finally:
        await sink.aclose()
    assert "RabbitMQ has no queue 'outbox_celery_" in str(e.value)
    assert "start a Celery worker that consumes it" in str(e.value)


def _celery_send(url: str, queue: str) -> None:
    """Celery's own client sends the same task: the reference for the layout."""
    from celery import Celery

    app = Celery("reference", broker=url, set_as_current=False)
    try:
        app.send_task("tests.record", args=[1, "é"], kwargs={"k": [None]}, queue=queue)
    finally:
        app.close()


async def _raw_messages(transport: str, url: str, queue: str) -> list[dict[str, Any]]:
    """The queue's messages as the broker holds them: headers, properties, body."""
    if transport == "redis":
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(url)
        try:
            items = await client.lrange(queue, 0, -1)
        finally:
            await client.aclose()
        return [orjson.loads(item) for item in reversed(items)]  # LPUSH: oldest last
    import aio_pika

    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        got = []
        amqp_queue = await channel.get_queue(queue)
        while (m := await amqp_queue.get(no_ack=True, fail=False)) is not None:
            got.append(
                {
                    "headers": m.headers,
                    "properties": {
                        "content_type": m.content_type, "content_encoding": m.content_encoding,
                        "delivery_mode": int(m.delivery_mode), "priority": m.priority,
                        "correlation_id": m.correlation_id, "reply_to": m.reply_to,
                    },
                    "body": orjson.loads(m.body),
                }
            )  # fmt: skip
        return got
    finally:
        await connection.close()


async def test_the_message_on_the_broker_has_the_layout_of_celerys_own(transport: str) -> None:
    url, queue = broker_url(transport), queue_name()
    try:
        # Celery's client declares the queue (as its worker would) and sends; then we do.
        await anyio.to_thread.run_sync(_celery_send, url, queue)
        sink = celery_sink(url, timeout=10)
        try:
            payload = {"task": "tests.record", "args": [1, "é"], "kwargs": {"k": [None]}}
            await sink.deliver(_intent(1, payload | {"queue": queue}))
        finally:
            await sink.aclose()
        theirs, ours = await _raw_messages(transport, url, queue)
    finally:
        await forget_queue(transport, url, queue)
    assert ours["headers"].keys() == theirs["headers"].keys()
    # Per message: the ids and the sender. ignore_result: send_task leaves it None, a
    # task's delay() (our model) sends False; both leave it to the task's own setting.
    ids = ("id", "root_id", "origin", "ignore_result")
    assert {k: v for k, v in ours["headers"].items() if k not in ids} == {
        k: v for k, v in theirs["headers"].items() if k not in ids
    }
    assert ours.keys() == theirs.keys()
    if transport == "redis":
        assert ours["properties"].keys() == theirs["properties"].keys()
        assert ours["properties"]["delivery_info"] == theirs["properties"]["delivery_info"]
        assert orjson.loads(base64.b64decode(ours["body"])) == orjson.loads(
            base64.b64decode(theirs["body"])
        )
        for same in ("content-type", "content-encoding"):
            assert ours[same] == theirs[same]
        ours["properties"], theirs["properties"] = (
            {
                k: v
                for k, v in m["properties"].items()
                if k not in ("correlation_id", "delivery_tag")
            }
            for m in (ours, theirs)
        )
    else:
        assert ours["body"] == theirs["body"]
        for m in (ours, theirs):
            assert m["properties"].pop("correlation_id") == m["headers"]["id"]
    # reply_to: Celery's client names itself there for RPC results; we have none to name.
    assert not ours["properties"].pop("reply_to") and theirs["properties"].pop("reply_to")
    assert ours["properties"] == theirs["properties"]


async def test_the_trace_context_rides_in_the_message_headers(transport: str) -> None:
    url, queue = broker_url(transport), queue_name()
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    try:
        await anyio.to_thread.run_sync(_celery_send, url, queue)  # declares the queue
        sink = celery_sink(url, timeout=10)
        try:
            payload = {"task": "tests.record", "queue": queue}
            await sink.deliver(
                replace(_intent(1, payload), trace_context={"traceparent": traceparent})
            )
        finally:
            await sink.aclose()
        theirs, ours = await _raw_messages(transport, url, queue)
    finally:
        await forget_queue(transport, url, queue)
    assert ours["headers"]["traceparent"] == traceparent and "tracestate" not in ours["headers"]
    assert "traceparent" not in theirs["headers"]


async def test_a_wrong_password_is_transient_and_never_shown(transport: str) -> None:
    parts = urlsplit(broker_url(transport))
    where = f"{parts.hostname}:{parts.port or (5672 if transport == 'amqp' else 6379)}"
    user = queue_name()
    if transport == "amqp":
        url = f"amqp://guest:sekrit-pw-123@{where}/"
    else:  # a user of this test's own (a server without passwords takes any)
        url = f"redis://{user}:sekrit-pw-123@{where}/0"
        await _redis_acl(broker_url(transport), "SETUSER", user, "on", ">right-pw", "+ping")
    sink = celery_sink(url, timeout=10)
    try:
        with pytest.raises(TransientError, match="cannot connect") as e:
            await sink.deliver(_intent(1, {"task": "t", "queue": queue_name()}))
    finally:
        await sink.aclose()
        if transport == "redis":
            await _redis_acl(broker_url(transport), "DELUSER", user)
    assert "sekrit-pw-123" not in str(e.value)


async def _redis_acl(url: str, *command: str) -> None:
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(url)
    try:
        await client.execute_command("ACL", *command)
    finally:
        await client.aclose()


async def test_a_redis_error_fails_only_its_own_intents() -> None:
    import redis.asyncio

    url, queue, other = broker_url("redis"), queue_name(), queue_name()
    client = redis.asyncio.Redis.from_url(url)
    await client.set(queue, "not a list")  # LPUSH onto it: WRONGTYPE
    sink = celery_sink(url, timeout=10)
    try:
        results = await sink.deliver_many(
            [_intent(1, {"task": "t", "queue": queue}), _intent(2, {"task": "t", "queue": other})]
        )
        assert isinstance(results[0], TransientError) and "WRONGTYPE" in str(results[0])
        assert results[1] is None and await client.llen(other) == 1
    finally:
        await sink.aclose()
        await client.delete(queue, other)
        await client.aclose()
