"""Real worker processes on the kafka kind: killed between the produce and the outcome, and
with a SASL password that must never show.

kill -9 between the produce and the outcome:

Once the worker's producer is up (it delivered a first intent), the broker (Tansu) is frozen
(SIGSTOP) and more intents come: the worker produces them, its requests wait in the broker's
socket, unanswered, and the intents stay ``processing``. The worker is killed, the broker
thawed: it stores (some of) what the dead worker had sent. Once the lease runs out, a second
worker sends those intents again. Each of them is then in the topic twice, both copies with
the same ``outbox-message-id`` header (the intent id), which is what a consumer drops
duplicates by; nothing is lost.
"""

from __future__ import annotations

import secrets
from collections import Counter

import anyio
import orjson

from tests.conftest import wait_until
from tests.fault.conftest import Spawn
from tests.fault.ledger import Outbox
from tests.kafka_broker import Tansu, create_topic, read_all

TOPIC, PARTITIONS = "orders", 3


async def test_a_record_sent_again_after_kill9_carries_the_same_id(
    outbox: Outbox, spawn: Spawn, own_tansu: Tansu
) -> None:
    await create_topic(own_tansu.bootstrap, TOPIC, PARTITIONS)
    kafka = ["--kafka-url", own_tansu.url, "--message-id-prefix", "shop-"]
    ids = [await _enqueue(outbox, 0)]
    worker = await spawn(concurrency=8, lease=3.0, extra=kafka)
    await wait_until(lambda: _sent(outbox, 1), timeout=60)
    own_tansu.freeze()
    try:
        ids += [await _enqueue(outbox, n) for n in range(1, 21)]
        # It claimed a batch and produced it into the frozen broker's socket.
        await wait_until(lambda: _held(outbox, worker.pid, 8), timeout=60)
        await anyio.sleep(1.0)  # the producer's thread has flushed the batch by now
        held = await outbox.processing(locked_by_pid=worker.pid)
        worker.kill()
        assert await worker.wait(timeout=10) == -9
    finally:
        own_tansu.thaw()
    await spawn(concurrency=8, lease=3.0, extra=kafka)
    await outbox.wait_settled(timeout=90)
    assert await outbox.counts() == Counter(sent=21)
    records = await read_all(own_tansu.bootstrap, {TOPIC: PARTITIONS}, at_least=21)
    copies = Counter(r.message_id for r in records)
    assert set(copies) == {f"shop-{i}" for i in ids}  # nothing lost, nothing unknown
    # What the dead worker had sent went out twice, under the same id; nothing else did.
    # (Tansu stores the first request waiting in a closed connection's socket, and drops
    # those after it once it sees the connection gone: not always all of them.)
    twice = {m for m, n in copies.items() if n > 1}
    assert twice and twice <= {f"shop-{i}" for i in held}
    assert max(copies.values()) == 2
    for message_id in copies:
        values = {r.value for r in records if r.message_id == message_id}
        assert len(values) == 1  # the copies are the same intent's record


async def _enqueue(outbox: Outbox, n: int) -> int:
    return await outbox.enqueue("kafka", orjson.dumps({"topic": TOPIC, "value": {"n": n}}).decode())


async def _sent(outbox: Outbox, n: int) -> bool:
    return (await outbox.counts())["sent"] >= n


async def _held(outbox: Outbox, pid: int, n: int) -> bool:
    return len(await outbox.processing(locked_by_pid=pid)) >= n


async def test_the_sasl_password_never_shows(
    outbox: Outbox, spawn: Spawn, own_tansu: Tansu
) -> None:
    """Debug logging on (librdkafka's own lines too), a SASL set-up that Tansu refuses: the
    failures are logged and the intent ends dead, and no line holds the password."""
    password = f"kafka-S3cret-{secrets.token_hex(4)}"
    await create_topic(own_tansu.bootstrap, TOPIC, PARTITIONS)
    await outbox.enqueue("kafka", '{"topic": "orders", "value": 1}', max_attempts=1)
    worker = await spawn(
        extra=[
            "-v", "--delivery-timeout", "5", "--kafka-url", own_tansu.url,
            "--kafka-config", "security.protocol=SASL_PLAINTEXT",
            "--kafka-config", "sasl.mechanism=PLAIN",
            "--kafka-config", "sasl.username=outbox",
            "--kafka-config", f"sasl.password={password}",
        ]
    )  # fmt: skip
    await wait_until(lambda: _dead(outbox), timeout=60)
    worker.terminate()
    await worker.wait(timeout=20)
    assert worker.logged("librdkafka")  # its lines were there to leak it
    assert password not in worker.output
    assert password not in str((await outbox.rows()).values())


async def _dead(outbox: Outbox) -> bool:
    return (await outbox.counts())["dead"] == 1
