"""The kafka sink through broker outages, each test with a Tansu broker of its own (the
session's one is shared): frozen with SIGSTOP (a hung broker: connections open, no answer)
then thawed; killed and restarted empty (the memory engine keeps nothing); killed and
restarted on its s3 engine (on moto's S3), which keeps topics, records and producer ids."""

from __future__ import annotations

import logging
import secrets
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bench.sqs_targets import moto_sqs_server
from tests.conftest import failed_at_least_once, statuses_are, wait_until
from tests.kafka_broker import Read, Tansu, create_topic, read_all
from worker.producer import enqueue
from worker.sinks.kafka.sink import KafkaSink
from worker.store.sqlfiles import Names

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def s3_tansu(tansu: Tansu, tmp_path: Path) -> Iterator[Tansu]:
    """Tansu storing in a bucket of moto's S3 server (both processes of this test's own)."""
    with moto_sqs_server() as (endpoint, _):  # the same server has S3
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/outbox", method="PUT"))
        env = {
            "AWS_ENDPOINT": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "x",
            "AWS_SECRET_ACCESS_KEY": "x", "AWS_REGION": "us-east-1",
        }  # fmt: skip
        broker = Tansu(tansu.binary, tmp_path, storage="s3://outbox/", env=env).start()
        try:
            yield broker
        finally:
            broker.stop()


@pytest.fixture
async def sink(own_tansu: Tansu) -> AsyncIterator[KafkaSink]:
    # A short timeout: each record's report, failed or not, comes within 3.5 s.
    kafka_sink = KafkaSink(own_tansu.url, timeout=4)
    try:
        yield kafka_sink
    finally:
        await kafka_sink.aclose()


async def _enqueue(db, names: Names, topic: str, numbers: range) -> None:
    async with db.transaction():
        for n in numbers:
            payload = {"topic": topic, "value": {"n": n}}
            await enqueue(db, "kafka", payload, ordering_key=f"k{n % 5}", schema=names.schema)


def _assert_keys_in_order(records: list[Read]) -> None:
    """A key's intents in order: a copy of each is stored before the next is produced, so
    the first copies are in intent order, whatever came twice."""
    for key in {r.key for r in records}:
        mine = sorted((r for r in records if r.key == key), key=lambda r: r.offset)
        firsts = list(dict.fromkeys(int(r.message_id) for r in mine))
        assert firsts == sorted(firsts)


def _outages(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The sink's outage lines in order, as "down" and "back"."""
    return [
        "down" if " is down " in r.getMessage() else "back"
        for r in caplog.records
        if r.name == "worker.sinks.kafka.sink"
        and r.levelno >= logging.WARNING
        and (" is down " in r.getMessage() or " is back after " in r.getMessage())
    ]


# One outage, two lines, whatever the number of intents and retries. A record whose report
# deadline falls within the few milliseconds after the broker answers again may time out
# after another went through: then it is told as a second, short outage.
ONE_OUTAGE = (["down", "back"], ["down", "back", "down", "back"])


async def test_a_frozen_broker_loses_nothing_and_is_one_outage(
    db,
    names: Names,
    start_relay,
    own_tansu: Tansu,
    sink: KafkaSink,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    topic = f"outbox_test_{secrets.token_hex(4)}"
    await create_topic(own_tansu.bootstrap, topic, 3)
    async with start_relay({"kafka": sink}, backoff_base=0.2, backoff_max=1.0, max_attempts=100):
        await _enqueue(db, names, topic, range(20))
        await wait_until(lambda: statuses_are(db, names, {"sent": 20}))
        own_tansu.freeze()
        try:
            await _enqueue(db, names, topic, range(20, 40))
            # The head of each of the 5 keys has timed out at least once while it hung.
            await wait_until(lambda: failed_at_least_once(db, names, 5), timeout=60)
        finally:
            own_tansu.thaw()
        await wait_until(lambda: statuses_are(db, names, {"sent": 40}), timeout=60)
    records = await read_all(own_tansu.bootstrap, {topic: 3}, at_least=40)
    ids = {str(r["id"]) for r in await db.fetch(f'SELECT id FROM "{names.schema}".intent')}
    # Nothing lost; a record the frozen broker took before it answered may be there twice,
    # with the same id header.
    assert {r.message_id for r in records} == ids
    _assert_keys_in_order(records)
    assert _outages(caplog) in ONE_OUTAGE


async def test_a_broker_that_lost_everything_gets_a_new_producer(
    db,
    names: Names,
    start_relay,
    own_tansu: Tansu,
    sink: KafkaSink,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """kill -9 of the memory engine: topics and records are gone, and librdkafka's
    idempotent producer is unknown to the new broker. Once the topic is back, the sink's new
    producer delivers what waited."""
    caplog.set_level(logging.INFO)
    topic = f"outbox_test_{secrets.token_hex(4)}"
    await create_topic(own_tansu.bootstrap, topic, 3)
    async with start_relay({"kafka": sink}, backoff_base=0.2, backoff_max=1.0, max_attempts=100):
        await _enqueue(db, names, topic, range(10))
        await wait_until(lambda: statuses_are(db, names, {"sent": 10}))
        own_tansu.kill()
        await _enqueue(db, names, topic, range(10, 30))
        await wait_until(lambda: failed_at_least_once(db, names, 5), timeout=60)
        own_tansu.start()
        await create_topic(own_tansu.bootstrap, topic, 3)
        await wait_until(lambda: statuses_are(db, names, {"sent": 30}), timeout=90)
    records = await read_all(own_tansu.bootstrap, {topic: 3}, at_least=20)
    rows = await db.fetch(f'SELECT id FROM "{names.schema}".intent ORDER BY id OFFSET 10')
    assert {r.message_id for r in records} == {str(r["id"]) for r in rows}
    assert _outages(caplog) in ONE_OUTAGE


async def test_a_broker_restarted_with_its_data_loses_nothing(
    db, names: Names, start_relay, s3_tansu: Tansu, caplog: pytest.LogCaptureFixture
) -> None:
    """kill -9 and a restart on the s3 engine: what was stored stays, what waited is sent,
    nothing is dead, each key in order."""
    caplog.set_level(logging.INFO)
    topic = f"outbox_test_{secrets.token_hex(4)}"
    await create_topic(s3_tansu.bootstrap, topic, 3)
    kafka_sink = KafkaSink(s3_tansu.url, timeout=4)
    try:
        async with start_relay(
            {"kafka": kafka_sink}, backoff_base=0.2, backoff_max=1.0, max_attempts=100
        ):
            await _enqueue(db, names, topic, range(20))
            await wait_until(lambda: statuses_are(db, names, {"sent": 20}), timeout=60)
            s3_tansu.kill()
            await _enqueue(db, names, topic, range(20, 40))
            await wait_until(lambda: failed_at_least_once(db, names, 5), timeout=60)
            s3_tansu.start()
            await wait_until(lambda: statuses_are(db, names, {"sent": 40}), timeout=90)
    finally:
        await kafka_sink.aclose()
    records = await read_all(s3_tansu.bootstrap, {topic: 3}, at_least=40)
    ids = {str(r["id"]) for r in await db.fetch(f'SELECT id FROM "{names.schema}".intent')}
    assert {r.message_id for r in records} == ids
    _assert_keys_in_order(records)
    assert _outages(caplog) in ONE_OUTAGE
