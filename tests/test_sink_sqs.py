"""The sqs sink against a real SQS-compatible server: moto's server mode, a subprocess started
by the suite (tests/sqs_helpers.py). "Server down" is a TCP proxy between the sink and it."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from aiobotocore.session import get_session

from bench.sqs_targets import REGION, moto_sqs_server
from tests.conftest import failed_at_least_once, statuses_are, wait_until
from tests.docs_text import doc_snippet
from tests.sink_helpers import assert_outcomes
from tests.sqs_helpers import MotoServer, SqsQueues, attribute, sqs_queues
from tests.sqs_helpers import sqs_server as sqs_server  # the fixture
from tests.tcp_proxy import TcpProxy
from tests.test_cli import _env, worker_argv
from tests.test_sink_extras import _without as without_extra
from worker.cli.app import build_sinks
from worker.errors import ConfigError, PermanentError, TransientError
from worker.intent import Intent
from worker.producer import enqueue
from worker.settings import Settings
from worker.sinks.base import BatchSink
from worker.sinks.registry import UnavailableSink
from worker.sinks.sqs.message import ID_ATTRIBUTE, build_message
from worker.sinks.sqs.sink import SqsSink
from worker.store.sqlfiles import Names

CREATED = datetime(2026, 12, 4, 8, 0, tzinfo=UTC)
URL = "https://sqs.eu-west-1.amazonaws.com/123456789012/orders"
TRACE = {
    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "tracestate": "vendor=1",
}


def _intent(payload: Any, n: int = 7, key: str | None = None) -> Intent:
    return Intent(
        id=n, kind="sqs", payload=payload, attempts=1, max_attempts=5, created_at=CREATED,
        run_at=CREATED, ordering_key=key,
    )  # fmt: skip


@pytest.fixture
async def queues(sqs_server: MotoServer) -> AsyncIterator[SqsQueues]:
    async with sqs_queues(sqs_server) as target:
        yield target


@pytest.fixture
async def sink(sqs_server: MotoServer) -> AsyncIterator[SqsSink]:
    sqs_sink = SqsSink(timeout=10)
    try:
        yield sqs_sink
    finally:
        await sqs_sink.aclose()


# --- pure parts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "key", "message"),
    [
        ([1], None, "payload must be a JSON object, got list"),
        ({"body": "x"}, None, "needs 'queue_url'"),
        ({"queue_url": "sqs://x/1/q", "body": "x"}, None, "is not a queue URL"),
        ({"queue_url": URL + "/", "body": "x"}, None, "is not a queue URL"),
        ({"queue_url": URL + "?a=1", "body": "x"}, None, "is not a queue URL"),
        ({"queue_url": URL[:-6] + "o" * 81, "body": "x"}, None, "is not a queue URL"),
        ({"queue_url": URL, "body": ""}, None, "'body' must not be empty"),
        ({"queue_url": URL, "body": "a\x00b"}, None, "characters SQS does not accept"),
        ({"queue_url": URL, "body": 1, "topic": "t"}, None, "unknown field(s): topic"),
        ({"queue_url": URL, "body": 1, "attributes": [1]}, None, "'attributes' must be an object"),
        ({"queue_url": URL, "body": 1, "attributes": {"AWS.x": "1"}}, None, "is not valid"),
        ({"queue_url": URL, "body": 1, "attributes": {"a..b": "1"}}, None, "is not valid"),
        ({"queue_url": URL, "body": 1, "attributes": {"a": ""}}, None, "non-empty string or a"),
        ({"queue_url": URL, "body": 1, "attributes": {"a": True}}, None, "non-empty string or a"),
        ({"queue_url": URL, "body": 1, "attributes": {ID_ATTRIBUTE: "1"}}, None, "set by the"),
        (
            {"queue_url": URL, "body": 1, "attributes": {f"a{n}": "v" for n in range(10)}},
            None,
            "would have 11 attributes, SQS takes 10",
        ),
        ({"queue_url": URL, "body": 1, "delay_seconds": 901}, None, "from 0 to 900"),
        ({"queue_url": URL, "body": 1, "delay_seconds": 1.5}, None, "from 0 to 900"),
        ({"queue_url": URL + ".fifo", "body": 1}, None, "FIFO queue needs a message group"),
        ({"queue_url": URL + ".fifo", "body": 1, "delay_seconds": 5}, "k", "not allowed for a"),
        ({"queue_url": URL + ".fifo", "body": 1}, "order 42", "(from the ordering_key) is not"),
        ({"queue_url": URL + ".fifo", "body": 1, "group_id": "é"}, "k", "(from the group_id)"),
    ],
)
def test_bad_payloads_are_permanent(payload: Any, key: str | None, message: str) -> None:
    with pytest.raises(PermanentError, match=r"^sqs ") as e:
        build_message(_intent(payload, key=key))
    assert message in str(e.value)


def test_a_standard_message_carries_the_intent_id_and_the_trace_context() -> None:
    payload = {"queue_url": URL, "body": {"order": 42}, "attributes": {"tenant": "acme",
               "priority": 5, "traceparent": "stale"}, "delay_seconds": 30}  # fmt: skip
    message = build_message(replace(_intent(payload), trace_context=TRACE), "eu-")
    assert message.queue_url == URL
    assert message.entry == {
        "MessageBody": '{"order":42}',
        "DelaySeconds": 30,
        "MessageAttributes": {
            "tenant": {"DataType": "String", "StringValue": "acme"},
            "priority": {"DataType": "Number", "StringValue": "5"},
            "traceparent": {"DataType": "String", "StringValue": TRACE["traceparent"]},
            "tracestate": {"DataType": "String", "StringValue": "vendor=1"},
            ID_ATTRIBUTE: {"DataType": "String", "StringValue": "eu-7"},
        },
    }
    # As SQS counts it: the body, then each attribute's name, type and value.
    assert message.size == len('{"order":42}') + sum(
        len(name) + len(a["DataType"]) + len(a["StringValue"])
        for name, a in message.entry["MessageAttributes"].items()
    )


def test_a_fifo_message_is_grouped_by_ordering_key_and_deduplicated_by_intent_id() -> None:
    fifo = URL + ".fifo"
    entry = build_message(_intent({"queue_url": fifo, "body": "hi"}, key="order-42"), "eu-").entry
    assert (entry["MessageGroupId"], entry["MessageDeduplicationId"]) == ("order-42", "eu-7")
    assert entry["MessageBody"] == "hi"  # a string body is sent as it is
    by_payload = build_message(_intent({"queue_url": fifo, "body": 1, "group_id": "g"}, key="k"))
    assert (by_payload.entry["MessageGroupId"], by_payload.entry["MessageDeduplicationId"]) == (
        "g",
        "7",
    )


def test_a_prefix_that_cannot_start_a_deduplication_id_is_refused() -> None:
    with pytest.raises(ConfigError, match="--message-id-prefix must be up to 100 ASCII"):
        SqsSink(id_prefix="bad prefix ")


SQS_ON = Settings(sink_options={"sqs": True})


def test_wiring_configured_or_not(monkeypatch: pytest.MonkeyPatch) -> None:
    sinks = build_sinks(Settings())
    assert isinstance(sinks["sqs"], UnavailableSink)
    assert "start it with --sqs or OUTBOX_SQS=1" in sinks["sqs"].reason
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_CONFIG_FILE", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")  # no profile's region either
    with pytest.raises(ConfigError, match="the sqs kind needs an AWS region: set AWS_REGION"):
        build_sinks(SQS_ON)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert isinstance(build_sinks(SQS_ON)["sqs"], SqsSink)
    without_extra(monkeypatch, "aiobotocore.config", "worker.sinks.sqs.sink")
    with pytest.raises(ConfigError, match=r"pip install 'pg-outbox-relay\[sqs\]'"):
        build_sinks(SQS_ON)


# --- against the server ----------------------------------------------------------------------


async def test_a_batch_to_a_standard_queue_is_stored_with_its_attributes(
    sink: SqsSink, queues: SqsQueues
) -> None:
    assert isinstance(sink, BatchSink) and sink.max_batch == 10
    url = await queues.create("orders")
    traced = replace(_intent({"queue_url": url, "body": {"n": 0}}, n=100), trace_context=TRACE)
    batch = [traced] + [
        _intent({"queue_url": url, "body": {"n": n}, "attributes": {"tenant": "acme"}}, n=100 + n)
        for n in range(1, 10)
    ]
    assert await sink.deliver_many(batch) == [None] * 10
    late = {"queue_url": url, "body": "late", "delay_seconds": 1, "group_id": "tenant-1"}
    await sink.deliver(_intent(late, n=110))
    messages: list[dict[str, Any]] = []

    async def all_arrived() -> bool:  # the delayed one comes a second later
        messages.extend(await queues.drain(url))
        return len(messages) >= 11

    await wait_until(all_arrived)
    by_id = {attribute(m, ID_ATTRIBUTE): m for m in messages}
    assert sorted(by_id) == [str(n) for n in range(100, 111)]
    assert orjson.loads(by_id["105"]["Body"]) == {"n": 5} and by_id["110"]["Body"] == "late"
    # A group on a standard queue is passed on (SQS fair queues); none unless given.
    assert by_id["110"]["Attributes"]["MessageGroupId"] == "tenant-1"
    assert "MessageGroupId" not in by_id["105"]["Attributes"]
    assert attribute(by_id["105"], "tenant") == "acme"
    assert attribute(by_id["100"], "traceparent") == TRACE["traceparent"]
    assert attribute(by_id["101"], "traceparent") is None


async def test_a_mixed_batch_has_one_outcome_per_intent_and_sends_nothing_too_large(
    sink: SqsSink, queues: SqsQueues
) -> None:
    small = await queues.create("small", MaximumMessageSize="1024")
    fifo = await queues.create("events.fifo")
    missing = small.replace("small", "missing")
    results = await sink.deliver_many(
        [
            _intent({"queue_url": small, "body": "ok"}, n=1),
            _intent({"queue_url": small, "body": "x" * 1001}, n=2),  # + its id attribute: 1,025
            _intent({"queue_url": missing, "body": "x"}, n=3),
            _intent({"queue_url": fifo, "body": "x"}, n=4),  # no group
            _intent({"queue_url": fifo, "body": "y"}, n=5, key="k"),
        ]
    )
    assert_outcomes(
        results,
        [
            None,
            (
                PermanentError,
                "of 1,024 bytes (1 KiB), the queue's MaximumMessageSize; nothing was sent",
            ),
            (PermanentError, f"sqs queue {missing} does not exist"),
            (PermanentError, "FIFO queue needs a message group"),
            None,
        ],
    )
    assert [m["Body"] for m in await queues.drain(small)] == ["ok"]  # the large one never left
    assert [m["Body"] for m in await queues.drain(fifo)] == ["y"]


async def test_a_duplicate_publish_to_a_fifo_queue_is_dropped(
    sink: SqsSink, queues: SqsQueues
) -> None:
    url = await queues.create("dup.fifo")
    intent = _intent({"queue_url": url, "body": "once"}, n=9, key="k")
    await sink.deliver(intent)
    await sink.deliver(replace(intent, attempts=2))  # a retry: same deduplication id
    [message] = await queues.drain(url)
    assert message["Attributes"]["MessageDeduplicationId"] == "9"


async def test_the_relay_keeps_each_ordering_key_in_order_in_its_message_group(
    db, names: Names, start_relay, sink: SqsSink, queues: SqsQueues
) -> None:
    url = await queues.create("orders.fifo")
    keys = ["order-1", "order-2", "order-3"]
    async with start_relay({"sqs": sink}, concurrency=8):
        async with db.transaction():
            for n in range(30):  # interleaved: 0, 1, 2 are the first of each key
                payload = {"queue_url": url, "body": {"n": n}}
                await enqueue(db, "sqs", payload, ordering_key=keys[n % 3], schema=names.schema)
        await wait_until(lambda: statuses_are(db, names, {"sent": 30}))
    messages = await queues.drain(url)
    assert len(messages) == 30
    for key in keys:
        group = [orjson.loads(m["Body"])["n"] for m in messages
                 if m["Attributes"]["MessageGroupId"] == key]  # fmt: skip
        assert group == sorted(group) and len(group) == 10
    ids = {r["id"] for r in await db.fetch(f'SELECT id FROM "{names.schema}".intent')}
    assert {int(m["Attributes"]["MessageDeduplicationId"]) for m in messages} == ids


async def test_server_down_then_back_loses_nothing_and_stores_each_once(
    db, names: Names, start_relay, sqs_server: MotoServer, queues: SqsQueues,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    url = await queues.create("outage.fifo")
    port = int(sqs_server.url.rpartition(":")[2])
    async with TcpProxy("127.0.0.1", port) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", f"http://127.0.0.1:{proxy.port}")
        sqs_sink = SqsSink(timeout=2)
        try:
            async with start_relay({"sqs": sqs_sink}, backoff_base=0.1, backoff_max=0.5):
                async with db.transaction():
                    for n in range(10):
                        payload = {"queue_url": url, "body": {"n": n}, "group_id": "g"}
                        await enqueue(db, "sqs", payload, schema=names.schema)
                await wait_until(lambda: statuses_are(db, names, {"sent": 10}))
                await proxy.stop()
                async with db.transaction():
                    for n in range(10, 20):
                        payload = {"queue_url": url, "body": {"n": n}, "group_id": "g"}
                        await enqueue(db, "sqs", payload, schema=names.schema)
                await wait_until(lambda: failed_at_least_once(db, names, 10))
                await proxy.start()
                await wait_until(lambda: statuses_are(db, names, {"sent": 20}), timeout=30)
        finally:
            await sqs_sink.aclose()
    errors = await db.fetch(f'SELECT last_error FROM "{names.schema}".intent')
    assert not any("sekrit-aws-key" in (r["last_error"] or "") for r in errors)
    bodies = sorted(orjson.loads(m["Body"])["n"] for m in await queues.drain(url))
    assert bodies == list(range(20))


async def test_an_unreachable_server_is_transient_for_each_intent(
    sqs_server: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with TcpProxy("127.0.0.1", 9) as proxy:
        await proxy.stop()
        monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", f"http://127.0.0.1:{proxy.port}")
        sqs_sink = SqsSink(timeout=2)
        url = f"http://127.0.0.1:{proxy.port}/123456789012/q"
        try:
            results = await sqs_sink.deliver_many(
                [_intent({"queue_url": url, "body": n}, n=n) for n in (1, 2)]
                + [_intent({"queue_url": url}, n=3)]
            )
        finally:
            await sqs_sink.aclose()
    assert_outcomes(
        results,
        [(TransientError, "sqs http://127.0.0.1"), (TransientError, "sqs http://127.0.0.1"),
         (PermanentError, "payload needs 'body'")],
    )  # fmt: skip
    assert results[0] is not results[1]
    assert not any("sekrit-aws-key" in str(r) for r in results)


async def test_a_publish_whose_answer_was_lost_to_a_killed_worker_is_dropped_by_fifo_dedup(
    db, names: Names, pg_dsn: str, sqs_server: MotoServer, queues: SqsQueues
) -> None:
    """The lost response, for real: a worker process sends through a proxy that holds every
    reply, so the message is stored but the worker never hears so; the test waits until the
    server holds it, then kill -9s the worker before it can record anything. A second worker
    rescues the intent when its lease runs out and sends it again, with the same
    MessageDeduplicationId: SQS drops the copy, and the intent ends sent with 2 attempts."""
    url = await queues.create("crash.fifo")
    port = int(sqs_server.url.rpartition(":")[2])
    payload = {"queue_url": url, "body": "first"}
    async with TcpProxy("127.0.0.1", port) as proxy:
        env = _env({"AWS_ENDPOINT_URL_SQS": f"http://127.0.0.1:{proxy.port}"})
        argv = worker_argv(pg_dsn, names.schema, "--sqs", "--lease", "5")
        worker = _start(argv, env)
        try:
            first = await enqueue(db, "sqs", payload, ordering_key="k", schema=names.schema)
            await wait_until(lambda: statuses_are(db, names, {"sent": 1}), timeout=60)
            proxy.hold_replies()  # from now on the worker hears nothing back
            second = await enqueue(
                db, "sqs", {**payload, "body": "second"}, ordering_key="k", schema=names.schema
            )
            await wait_until(lambda: _stored(queues, url, 2))
        finally:
            worker.kill()  # SIGKILL: no outcome written, no lease released
            worker.wait()
        assert await _status(db, names, second) == "processing"
        proxy.release_replies()
        again = _start(argv, env)
        try:
            await wait_until(lambda: statuses_are(db, names, {"sent": 2}), timeout=60)
        finally:
            again.kill()
            again.wait()
    rows = await db.fetch(f'SELECT id, attempts FROM "{names.schema}".intent ORDER BY id')
    assert [(r["id"], r["attempts"]) for r in rows] == [(first, 1), (second, 2)]
    messages = await queues.drain(url)
    assert [m["Body"] for m in messages] == ["first", "second"]


def _start(argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def _stored(queues: SqsQueues, url: str, n: int) -> bool:
    return await queues.count(url) >= n


async def _status(db: Any, names: Names, intent_id: int) -> str:
    return str(
        await db.fetchval(f'SELECT status FROM "{names.schema}".intent WHERE id = $1', intent_id)
    )


async def test_the_documented_sql_snippet_sends_both_messages(
    db, names: Names, start_relay, sink: SqsSink, queues: SqsQueues,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    sql = doc_snippet("kinds/sqs.md", "Payload", "sql").text
    emails, orders = await queues.create("emails"), await queues.create("orders.fifo")
    aws = "https://sqs.eu-west-1.amazonaws.com/123456789012/"
    sql = sql.replace(aws + "emails", emails).replace(aws + "orders.fifo", orders)
    caplog.set_level("INFO", logger="worker.sinks.sqs.sink")
    await db.execute(sql.replace("outbox.", f'"{names.schema}".'))
    async with start_relay({"sqs": sink}):
        await wait_until(lambda: statuses_are(db, names, {"sent": 2}))
    ids = [r["id"] for r in await db.fetch(f'SELECT id FROM "{names.schema}".intent ORDER BY id')]
    [email] = await queues.drain(emails)
    assert orjson.loads(email["Body"]) == {"user_id": 42}
    assert (attribute(email, "tenant"), attribute(email, ID_ATTRIBUTE)) == ("acme", str(ids[0]))
    [order] = await queues.drain(orders)
    assert orjson.loads(order["Body"]) == {"order_id": 42, "status": "paid"}
    assert order["Attributes"]["MessageGroupId"] == "order-42"
    assert order["Attributes"]["MessageDeduplicationId"] == str(ids[1])
    # The log names the region and endpoint in use, and no key.
    assert "sqs client ready (region eu-west-1, endpoint http://127.0.0.1:" in caplog.text
    assert "sekrit-aws-key" not in caplog.text


async def test_a_batch_refused_for_one_entry_is_sent_again_entry_by_entry(
    sink: SqsSink, queues: SqsQueues
) -> None:
    """The queue's limit was lowered after the sink cached it: SQS refuses the whole batch
    for the one entry now too large; sent one by one, only that one is dead."""
    url = await queues.create("shrunk")
    assert await sink.deliver_many([_intent({"queue_url": url, "body": "warm-up"}, n=1)]) == [None]
    await queues.client.set_queue_attributes(
        QueueUrl=url, Attributes={"MaximumMessageSize": "1024"}
    )
    results = await sink.deliver_many(
        [_intent({"queue_url": url, "body": body}, n=n) for n, body in
         [(2, "before"), (3, "x" * 2000), (4, "after")]]
    )  # fmt: skip
    assert_outcomes(results, [None, (PermanentError, "sqs refused the message for"), None])
    assert sorted(m["Body"] for m in await queues.drain(url)) == ["after", "before", "warm-up"]


async def test_with_iam_checks_a_denied_queue_is_dead_and_a_wrong_key_is_transient(
    sqs_server: MotoServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A second moto server, with its IAM checks on: the first 5 requests (the set-up, with
    the session's dummy key) go unchecked, then each needs a key and a policy allowing it."""
    with moto_sqs_server(env={"INITIAL_NO_AUTH_ACTION_COUNT": "5"}) as (url, _):
        session = get_session()
        async with (
            session.create_client("sqs", endpoint_url=url, region_name=REGION) as sqs,
            session.create_client("iam", endpoint_url=url, region_name=REGION) as iam,
        ):
            allowed = (await sqs.create_queue(QueueName="allowed"))["QueueUrl"]
            denied = (await sqs.create_queue(QueueName="denied"))["QueueUrl"]
            await iam.create_user(UserName="relay")
            # AWS authorises SendMessageBatch as sqs:SendMessage; moto wants it by name too.
            # No sqs:GetQueueAttributes: the sink checks sizes against 1 MiB only.
            statement = {"Effect": "Allow", "Action": ["sqs:SendMessage", "sqs:SendMessageBatch"],
                         "Resource": "arn:aws:sqs:eu-west-1:123456789012:allowed"}  # fmt: skip
            await iam.put_user_policy(
                UserName="relay",
                PolicyName="outbox",
                PolicyDocument=orjson.dumps(
                    {"Version": "2012-10-17", "Statement": [statement]}
                ).decode(),
            )
            key = (await iam.create_access_key(UserName="relay"))["AccessKey"]
        monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", url)
        monkeypatch.setenv("AWS_REGION", REGION)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        results = []
        for secret in (key["SecretAccessKey"], "wrong-secret-key"):
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
            sqs_sink = SqsSink(timeout=5)
            try:
                results.append(
                    await sqs_sink.deliver_many(
                        [
                            _intent({"queue_url": q, "body": "hi"}, n=n)
                            for n, q in enumerate([allowed, denied])
                        ]
                    )
                )
            finally:
                await sqs_sink.aclose()
    right, wrong = results
    assert_outcomes(
        right, [None, (PermanentError, f"sqs access denied to {denied} (AccessDenied: User")]
    )
    assert "no sqs:GetQueueAttributes permission on" in caplog.text
    # A key the server does not accept is the operator's to fix: retried, not dead.
    assert_outcomes(wrong, [(TransientError, "SignatureDoesNotMatch")] * 2)
    assert not any(
        key["SecretAccessKey"] in str(r) or "wrong-secret-key" in str(r) for r in right + wrong
    )
