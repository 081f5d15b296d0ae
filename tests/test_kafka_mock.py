"""The kafka sink against librdkafka's mock cluster (tests/kafka_mock.py), for the broker
errors Tansu never returns: a record too large for the topic, authorization refused (for the
topic, or for idempotent writes), not enough in-sync replicas."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import pytest
from confluent_kafka import KafkaError

from tests.kafka_mock import INIT_PRODUCER_ID, PRODUCE, MockCluster, mock_cluster
from tests.sink_helpers import assert_outcomes
from worker.errors import PermanentError, TransientError
from worker.intent import Intent
from worker.sinks.kafka.sink import KafkaSink


@pytest.fixture
def cluster() -> Iterator[MockCluster]:
    with mock_cluster(3) as mock:
        mock.create_topic("orders", 3, 3)
        yield mock


@pytest.fixture
async def sink(cluster: MockCluster) -> AsyncIterator[KafkaSink]:
    kafka_sink = KafkaSink(cluster.url, timeout=4)  # every report within 2.6 s
    try:
        # The first delivery also waits for the producer id.
        assert await kafka_sink.deliver_many([_intent(0)]) == [None]
        yield kafka_sink
    finally:
        await kafka_sink.aclose()


def _intent(n: int, topic: str = "orders") -> Intent:
    now = datetime.now(UTC)
    return Intent(
        id=n, kind="kafka", payload={"topic": topic, "value": {"n": n}}, attempts=1,
        max_attempts=5, created_at=now, run_at=now,
    )  # fmt: skip


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "worker.sinks.kafka.sink" and r.levelno >= logging.WARNING
    ]


async def _dead_once(cluster: MockCluster, sink: KafkaSink, error: int) -> str:
    """The reason of an intent whose produce request the broker answers with ``error``."""
    cluster.push_errors(PRODUCE, error)
    [refused] = await sink.deliver_many([_intent(1)])
    assert isinstance(refused, PermanentError)
    return str(refused)


async def test_a_record_the_broker_finds_too_large_is_dead(
    cluster: MockCluster, sink: KafkaSink
) -> None:
    reason = await _dead_once(cluster, sink, KafkaError.MSG_SIZE_TOO_LARGE)
    assert "refused the record for topic 'orders' as too large" in reason
    assert "the producer's limit is 1,000,000 bytes" in reason
    assert await sink.deliver_many([_intent(2)]) == [None]


async def test_authorization_refused_is_dead_until_granted(
    cluster: MockCluster, sink: KafkaSink
) -> None:
    reason = await _dead_once(cluster, sink, KafkaError.TOPIC_AUTHORIZATION_FAILED)
    assert "refused to let this worker write to topic 'orders'" in reason
    # Granted since (the mock refused one request only): librdkafka still holds the topic's
    # error and refuses at once; the sink fetches its metadata anew and sends it.
    assert await sink.deliver_many([_intent(2)]) == [None]


async def test_idempotent_writes_refused_are_dead_with_one_line(
    cluster: MockCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """No IdempotentWrite on the cluster: every producer fails fatally at its start. Each
    intent is dead with the reason (not retried for ever), one line says so."""
    caplog.set_level(logging.WARNING)
    cluster.push_errors(INIT_PRODUCER_ID, *[KafkaError.CLUSTER_AUTHORIZATION_FAILED] * 20)
    kafka_sink = KafkaSink(cluster.url, timeout=4)
    try:
        for n in range(3):
            [refused] = await kafka_sink.deliver_many([_intent(n)])
            assert isinstance(refused, PermanentError)
            assert "CLUSTER_AUTHORIZATION_FAILED" in str(refused)
            assert "IdempotentWrite" in str(refused)
    finally:
        await kafka_sink.aclose()
    assert len([w for w in _warnings(caplog) if "starting a new producer" in w]) == 1


async def test_not_enough_replicas_is_retried_then_an_outage(
    cluster: MockCluster, sink: KafkaSink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    # A few: librdkafka retries them itself, and the record is stored.
    cluster.push_errors(PRODUCE, *[KafkaError.NOT_ENOUGH_REPLICAS] * 3)
    assert await sink.deliver_many([_intent(1)]) == [None]
    assert _warnings(caplog) == []
    # For longer than the report deadline: transient, one "down" line, then "back".
    cluster.push_errors(PRODUCE, *[KafkaError.NOT_ENOUGH_REPLICAS] * 10_000)
    results = await sink.deliver_many([_intent(2), _intent(3)])
    assert_outcomes(results, [(TransientError, "no acknowledgement within 2.6s")] * 2)
    cluster.clear_errors(PRODUCE)
    assert await sink.deliver_many([_intent(4)]) == [None]
    down, back = _warnings(caplog)
    assert "is down (no acknowledgement within 2.6s" in down
    assert "is back after" in back
