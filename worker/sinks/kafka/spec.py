"""The ``kafka`` kind's spec (the sink: worker/sinks/kafka/sink.py): on with --kafka-url;
librdkafka properties (TLS, SASL, tuning) with --kafka-config, whose credentials are never
shown; how a Debezium outbox row is routed."""

from __future__ import annotations

from worker.sinks.base import Sink
from worker.sinks.kafka.config import (
    DEFAULT_PORT,
    BadValue,
    config_entry,
    parse_kafka_url,
    shown_config,
)
from worker.sinks.kafka.record import DEBEZIUM_TOPIC, KEY_ENCODINGS, PLACEHOLDER
from worker.sinks.spec import Endpoint, SinkContext, SinkOption, SinkSpec, Target, Values


def _build(ctx: SinkContext) -> Sink:
    from worker.sinks.kafka.sink import KafkaSink

    return KafkaSink(
        ctx.options["kafka_url"],
        config=ctx.options["kafka_config"],
        timeout=ctx.timeout,
        id_prefix=ctx.id_prefix,
        max_bytes=ctx.max_bytes,
        debezium_topic=ctx.options["kafka_debezium_topic"],
        key_encoding=ctx.options["kafka_key_encoding"],
    )


def _describe(values: Values) -> Target:
    brokers = parse_kafka_url(values["kafka_url"])
    endpoints = tuple(Endpoint(h, p, f"kafka://{h}:{p}") for h, p in brokers)
    shown = shown_config(values["kafka_config"])
    security = shown.get("security.protocol", "plaintext")
    text = f"{', '.join(e.shown for e in endpoints)} ({security}, acks=all, idempotent)"
    return Target("kafka", text, endpoints)


def _key_encoding(text: str) -> str:
    if text not in KEY_ENCODINGS:
        raise BadValue(f"expected one of {', '.join(KEY_ENCODINGS)}, got {text[:40]!r}")
    return text


def _topic_pattern(text: str) -> str:
    if PLACEHOLDER not in text:
        raise BadValue(f"expected a topic name with {PLACEHOLDER} (the aggregatetype) in it")
    return text


SPEC = SinkSpec(
    kinds=("kafka",),
    options=(
        SinkOption(
            "--kafka-url",
            "OUTBOX_KAFKA_URL",
            f"brokers for the kafka kind: kafka://host[:port][,host[:port]...] (port "
            f"{DEFAULT_PORT}); TLS and SASL with --kafka-config",
            secret="url",
        ),
        SinkOption(
            "--kafka-config",
            "OUTBOX_KAFKA_CONFIG",
            "a librdkafka producer property KEY=VALUE, e.g. security.protocol=SASL_SSL, "
            "sasl.password=... (repeatable; the variable: one a line); credentials are never shown",
            convert=config_entry,
            default=(),
            repeat=True,
            secret="text",  # it holds them: sasl.password=..., never shown whole
        ),
        SinkOption(
            "--kafka-debezium-topic",
            "OUTBOX_KAFKA_DEBEZIUM_TOPIC",
            f"topic of a Debezium outbox row, like Debezium's route.topic.replacement: "
            f"{PLACEHOLDER} is its aggregatetype",
            convert=_topic_pattern,
            default=DEBEZIUM_TOPIC,
        ),
        SinkOption(
            "--kafka-key-encoding",
            "OUTBOX_KAFKA_KEY_ENCODING",
            "key bytes of a Debezium outbox row's aggregateid, as the key converter of the "
            "Debezium set-up wrote them: string (StringConverter), json (JsonConverter, "
            "schemas.enable=false) or json-schema (JsonConverter's default)",
            convert=_key_encoding,
            default="string",
        ),
    ),
    build=_build,
    extra="kafka",
    configured=lambda values: bool(values["kafka_url"]),
    describe=_describe,
    timeout=30.0,
)
