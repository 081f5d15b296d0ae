"""The rabbitmq sink against the real broker at 127.0.0.1:5672 (or OUTBOX_TEST_RABBITMQ_URL).

Without a broker the tests that need one are skipped, saying how to start it (they fail in
CI: the ``amqp_url`` fixture); "broker down" is simulated with a TCP proxy so the machine's
RabbitMQ stays up.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import anyio
import orjson
import pytest
from aio_pika.abc import AbstractIncomingMessage

from tests.conftest import failed_at_least_once, statuses_are, wait_until
from tests.sink_helpers import (
    assert_outcomes,
    assert_unreachable_batch_fails_each_intent,
    assert_waiters_share_a_failed_connect,
)
from tests.tcp_proxy import TcpProxy, free_port
from worker.errors import ConfigError, PermanentError, TransientError
from worker.intent import Intent
from worker.producer import enqueue
from worker.sinks.base import BatchSink
from worker.sinks.rabbitmq.sink import RabbitMQSink, build_message, parse_amqp_url
from worker.store.sqlfiles import Names


@dataclass
class Broker:
    """This test's own topic exchange, and a queue bound to ``order.#`` on it."""

    connection: aio_pika.abc.AbstractConnection
    exchange: str
    queue: aio_pika.abc.AbstractQueue

    async def messages(self) -> list[AbstractIncomingMessage]:
        got = []
        while (message := await self.queue.get(no_ack=True, fail=False)) is not None:
            got.append(message)
        return got


@pytest.fixture
async def broker(amqp_url: str) -> AsyncIterator[Broker]:
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    name = f"outbox_test_{secrets.token_hex(4)}"
    exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC)
    queue = await channel.declare_queue(name)
    await queue.bind(exchange, "order.#")
    try:
        yield Broker(connection, name, queue)
    finally:
        await queue.delete(if_unused=False, if_empty=False)
        await exchange.delete()
        await connection.close()


class Collected:
    """Every message consumed from the queue so far."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.messages: list[AbstractIncomingMessage] = []

    async def drain(self) -> list[AbstractIncomingMessage]:
        self.messages += await self.broker.messages()
        return self.messages

    def ids(self) -> list[str]:
        return [m.message_id or "" for m in self.messages]


def _intent(payload: Any, n: int = 7) -> Intent:
    now = datetime.now(UTC)
    return Intent(
        id=n, kind="rabbitmq", payload=payload, attempts=1, max_attempts=5, created_at=now,
        run_at=now,
    )  # fmt: skip


def _order(broker: Broker, n: int, **extra: Any) -> dict[str, Any]:
    return {"exchange": broker.exchange, "routing_key": "order.created", "body": {"n": n}, **extra}


# --- pure parts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("x", "must be a JSON object"),
        ({"exchange": "e"}, "needs 'routing_key'"),
        ({"routing_key": "k", "queue": "q"}, "unknown field"),
        ({"routing_key": "k", "exchange": "a b"}, "may contain only"),
        ({"routing_key": "k" * 256}, "longer than 255 bytes"),
        ({"routing_key": "k", "mandatory": "yes"}, "true or false"),
        ({"routing_key": "k", "headers": {"a": {"nested": 1}}}, "string/number/bool"),
    ],
)
def test_bad_payloads_are_permanent(payload: Any, message: str) -> None:
    with pytest.raises(PermanentError, match=message):
        build_message(_intent(payload))


def test_message_properties() -> None:
    exchange, key, message, mandatory = build_message(
        _intent({"exchange": "orders", "routing_key": "order.created", "body": [1], "type": "T"}),
        "shop-",
    )
    assert (exchange, key, mandatory) == ("orders", "order.created", True)
    assert message.message_id == "shop-7" and message.type == "T"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.content_type == "application/json" and message.body == b"[1]"


def test_url_checks() -> None:
    assert parse_amqp_url("amqps://u:p@mq.example/vh")[1] == "mq.example:5671"
    for bad, message in [
        ("http://x", "amqp:// or amqps://"),
        ("amqp:///vhost", "no host"),
        ("amqp://u:p@h:99999/", "cannot be parsed"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_amqp_url(bad)


# --- against the broker ----------------------------------------------------------------------


async def test_wrong_password_is_transient_and_never_shown(amqp_url: str) -> None:
    parts = urlsplit(amqp_url)
    sink = RabbitMQSink(
        f"amqp://guest:sekrit-pw-123@{parts.hostname}:{parts.port or 5672}/", timeout=10
    )
    try:
        with pytest.raises(TransientError, match="cannot connect") as e:
            await sink.deliver(_intent({"routing_key": "nowhere"}))
    finally:
        await sink.aclose()
    assert "sekrit-pw-123" not in str(e.value)


async def test_unroutable_is_transient_unless_not_mandatory(amqp_url: str, broker: Broker) -> None:
    sink = RabbitMQSink(amqp_url, timeout=10)
    try:
        with pytest.raises(TransientError, match="unroutable"):
            await sink.deliver(_intent({"exchange": broker.exchange, "routing_key": "other.x"}))
        await sink.deliver(
            _intent({"exchange": broker.exchange, "routing_key": "other.x", "mandatory": False})
        )
        await sink.deliver(_intent(_order(broker, 1)))  # the channel is still fine
    finally:
        await sink.aclose()
    assert [m.body for m in await broker.messages()] == [b'{"n":1}']


async def test_a_nack_is_transient(amqp_url: str, broker: Broker) -> None:
    # A queue that holds one message and rejects publishes beyond: the broker nacks them.
    channel = await broker.connection.channel()
    full = await channel.declare_queue(
        f"{broker.exchange}_full",
        auto_delete=True,
        arguments={"x-max-length": 1, "x-overflow": "reject-publish"},
    )
    await full.bind(broker.exchange, "full.#")
    sink = RabbitMQSink(amqp_url, timeout=10)
    payload = {"exchange": broker.exchange, "routing_key": "full.x", "body": 1}
    try:
        await sink.deliver(_intent(payload, n=1))
        with pytest.raises(TransientError, match="RabbitMQ nacked the message"):
            await sink.deliver(_intent(payload, n=2))
        await full.purge()
        await sink.deliver(_intent(payload, n=2))  # the retry, once there is room
    finally:
        await sink.aclose()
        await full.delete(if_unused=False, if_empty=False)
        await channel.close()


async def test_relay_publishes_confirmed_persistent_messages(
    db, names: Names, start_relay, amqp_url: str, broker: Broker
) -> None:
    sink = RabbitMQSink(amqp_url, timeout=10)
    collected = Collected(broker)
    try:
        async with start_relay({"rabbitmq": sink}):
            async with db.transaction():
                ids = [
                    await enqueue(
                        db,
                        "rabbitmq",
                        _order(broker, n, headers={"tenant": "acme"}, type="OrderCreated"),
                        schema=names.schema,
                    )
                    for n in range(10)
                ]
            await wait_until(lambda: statuses_are(db, names, {"sent": 10}))
    finally:
        await sink.aclose()
    # Sent means confirmed: every message is in the queue already.
    messages = await collected.drain()
    assert sorted(collected.ids()) == sorted(str(i) for i in ids)
    by_id = {m.message_id: m for m in messages}
    first = by_id[str(ids[0])]
    assert orjson.loads(first.body) == {"n": 0}
    assert first.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert first.content_type == "application/json" and first.type == "OrderCreated"
    assert first.headers == {"tenant": "acme"}


async def test_missing_exchange_is_dead_and_others_are_unaffected(
    db, names: Names, start_relay, amqp_url: str, broker: Broker
) -> None:
    sink = RabbitMQSink(amqp_url, timeout=10)
    collected = Collected(broker)
    try:
        async with start_relay({"rabbitmq": sink}, concurrency=8):
            async with db.transaction():
                missing = await enqueue(
                    db,
                    "rabbitmq",
                    {"exchange": f"{broker.exchange}_missing", "routing_key": "order.x"},
                    schema=names.schema,
                )
                for n in range(30):
                    await enqueue(db, "rabbitmq", _order(broker, n), schema=names.schema)
            await wait_until(lambda: statuses_are(db, names, {"sent": 30, "dead": 1}))
    finally:
        await sink.aclose()
    row = await db.fetchrow(
        f'SELECT attempts, last_error FROM "{names.schema}".intent WHERE id = $1', missing
    )
    assert row["attempts"] == 1
    assert row["last_error"].startswith(f"RabbitMQ exchange '{broker.exchange}_missing' does not")
    await collected.drain()
    assert len(set(collected.ids())) == 30


async def test_broker_down_then_back_loses_nothing(
    db, names: Names, start_relay, amqp_url: str, broker: Broker
) -> None:
    parts = urlsplit(amqp_url)
    collected = Collected(broker)
    async with TcpProxy("127.0.0.1", parts.port or 5672) as proxy:
        sink = RabbitMQSink(
            f"amqp://{parts.username}:{parts.password}@127.0.0.1:{proxy.port}/", timeout=5
        )
        try:
            async with start_relay({"rabbitmq": sink}, backoff_base=0.1, backoff_max=0.5):
                async with db.transaction():
                    for n in range(10):
                        await enqueue(db, "rabbitmq", _order(broker, n), schema=names.schema)
                await wait_until(lambda: statuses_are(db, names, {"sent": 10}))
                await proxy.stop()
                async with db.transaction():
                    for n in range(10, 20):
                        await enqueue(db, "rabbitmq", _order(broker, n), schema=names.schema)
                await wait_until(lambda: failed_at_least_once(db, names, 10))
                await proxy.start()
                await wait_until(lambda: statuses_are(db, names, {"sent": 20}), timeout=30)
        finally:
            await sink.aclose()
    await collected.drain()
    ids = await db.fetch(f'SELECT id FROM "{names.schema}".intent')
    assert set(collected.ids()) == {str(r["id"]) for r in ids}


async def test_connection_lost_before_the_confirm_is_transient(
    amqp_url: str, broker: Broker
) -> None:
    parts = urlsplit(amqp_url)
    collected = Collected(broker)
    async with TcpProxy("127.0.0.1", parts.port or 5672) as proxy:
        sink = RabbitMQSink(
            f"amqp://{parts.username}:{parts.password}@127.0.0.1:{proxy.port}/", timeout=10
        )
        try:
            await sink.deliver(_intent(_order(broker, 0), n=1))  # connected, exchange known
            proxy.hold_replies()  # the broker's confirm will not reach the sink
            failure: list[BaseException] = []

            async def publish() -> None:
                try:
                    await sink.deliver(_intent(_order(broker, 1), n=2))
                except TransientError as exc:
                    failure.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(publish)
                # The broker has the message (routed to the queue), the sink has no confirm.
                await wait_until(lambda: _queued(collected, 2))
                proxy.cut()
            proxy.release_replies()
            [exc] = failure
            assert "connection lost before the confirm" in str(exc)
            await sink.deliver(_intent(_order(broker, 1), n=2))  # the relay's retry
        finally:
            await sink.aclose()
    await collected.drain()
    # At least once: the retry is a duplicate, recognisable by its message_id.
    assert collected.ids() == ["1", "2", "2"]


async def _queued(collected: Collected, n: int) -> bool:
    return len(await collected.drain()) >= n


async def test_waiting_deliveries_share_a_failed_connect() -> None:
    sink = RabbitMQSink(f"amqp://guest:guest@127.0.0.1:{free_port()}/", timeout=5)
    await assert_waiters_share_a_failed_connect(sink, lambda n: _intent({"routing_key": "x"}, n=n))


# --- batches (deliver_many) ------------------------------------------------------------------


def _batch(broker: Broker, ids: range) -> list[Intent]:
    return [_intent(_order(broker, n), n=n) for n in ids]


def _proxied(amqp_url: str, proxy: TcpProxy, timeout: float) -> RabbitMQSink:
    return RabbitMQSink(proxy.rewrite(amqp_url), timeout=timeout)


async def test_a_full_batch_is_confirmed_and_queued_in_order(amqp_url: str, broker: Broker) -> None:
    sink = RabbitMQSink(amqp_url, timeout=10)
    assert isinstance(sink, BatchSink)
    batch = _batch(broker, range(1, sink.max_batch + 1))
    try:
        assert_outcomes(await sink.deliver_many(batch), [None] * len(batch))
    finally:
        await sink.aclose()
    messages = await broker.messages()  # confirmed: all queued already
    assert [m.message_id for m in messages] == [str(i.id) for i in batch]
    assert [orjson.loads(m.body)["n"] for m in messages] == [i.id for i in batch]


async def test_a_mixed_batch_has_one_outcome_per_intent(amqp_url: str, broker: Broker) -> None:
    channel = await broker.connection.channel()
    full = await channel.declare_queue(  # holds one message, the broker nacks the next
        f"{broker.exchange}_full",
        auto_delete=True,
        arguments={"x-max-length": 1, "x-overflow": "reject-publish"},
    )
    await full.bind(broker.exchange, "full.#")
    sink = RabbitMQSink(amqp_url, timeout=10)
    to_full = {"exchange": broker.exchange, "routing_key": "full.x"}
    unroutable = {"exchange": broker.exchange, "routing_key": "other.x"}
    batch = [
        _intent(_order(broker, 1), n=1),
        _intent({"exchange": broker.exchange}, n=2),
        _intent({"exchange": f"{broker.exchange}_missing", "routing_key": "order.x"}, n=3),
        _intent(unroutable, n=4),
        _intent(unroutable | {"mandatory": False}, n=5),
        _intent(to_full, n=6),
        _intent(to_full, n=7),
        _intent(_order(broker, 8), n=8),
    ]
    try:
        results = await sink.deliver_many(batch)
    finally:
        await sink.aclose()
        await full.delete(if_unused=False, if_empty=False)
        await channel.close()
    assert_outcomes(
        results,
        [
            None,
            (PermanentError, "needs 'routing_key'"),
            (PermanentError, f"RabbitMQ exchange '{broker.exchange}_missing' does not exist"),
            (TransientError, "unroutable"),
            None,
            None,
            (TransientError, "RabbitMQ nacked the message"),  # the queue was full by then
            None,
        ],
    )
    assert [m.message_id for m in await broker.messages()] == ["1", "8"]


async def test_a_batch_to_an_unreachable_broker_fails_each_intent() -> None:
    await assert_unreachable_batch_fails_each_intent(
        RabbitMQSink(f"amqp://guest:guest@127.0.0.1:{free_port()}/", timeout=5),
        lambda n: _intent({"routing_key": "x"}, n=n),
        _intent({"routing_key": 1}, n=9),
    )


async def test_a_batch_while_the_broker_is_down_is_transient_and_the_retry_delivers(
    amqp_url: str, broker: Broker
) -> None:
    parts = urlsplit(amqp_url)
    async with TcpProxy("127.0.0.1", parts.port or 5672) as proxy:
        sink = _proxied(amqp_url, proxy, timeout=5)
        try:
            assert_outcomes(await sink.deliver_many(_batch(broker, range(1, 2))), [None])
            await proxy.stop()
            batch = _batch(broker, range(2, 22))
            results = await sink.deliver_many(batch)
            assert_outcomes(results, [(TransientError, "RabbitMQ 127.0.0.1:")] * len(batch))
            await proxy.start()
            assert_outcomes(await sink.deliver_many(batch), [None] * len(batch))
        finally:
            await sink.aclose()
    assert [m.message_id for m in await broker.messages()] == [str(n) for n in range(1, 22)]


async def test_connection_lost_before_the_confirms_of_a_batch_is_transient(
    amqp_url: str, broker: Broker
) -> None:
    parts = urlsplit(amqp_url)
    collected = Collected(broker)
    batch = _batch(broker, range(2, 32))
    async with TcpProxy("127.0.0.1", parts.port or 5672) as proxy:
        sink = _proxied(amqp_url, proxy, timeout=10)
        try:
            assert_outcomes(await sink.deliver_many(_batch(broker, range(1, 2))), [None])
            proxy.hold_replies()  # the broker's confirms will not reach the sink
            results: list[BaseException | None] = []

            async def publish() -> None:
                results.extend(await sink.deliver_many(batch))

            async with anyio.create_task_group() as tg:
                tg.start_soon(publish)
                # The broker has queued the whole batch; the sink has no confirm.
                await wait_until(lambda: _queued(collected, 1 + len(batch)))
                proxy.cut()
            proxy.release_replies()
            lost = (TransientError, "connection lost before the confirm")
            assert_outcomes(results, [lost] * len(batch))
            assert_outcomes(await sink.deliver_many(batch), [None] * len(batch))  # the retry
        finally:
            await sink.aclose()
    await collected.drain()
    # At least once: the retried batch is queued twice, in order, recognisable by message_id.
    assert collected.ids() == ["1"] + [str(i.id) for i in batch] * 2


@pytest.mark.slow
async def test_flapping_connection_loses_nothing(
    db, names: Names, start_relay, amqp_url: str, broker: Broker
) -> None:
    parts = urlsplit(amqp_url)
    collected = Collected(broker)
    async with TcpProxy("127.0.0.1", parts.port or 5672) as proxy:
        sink = RabbitMQSink(
            f"amqp://{parts.username}:{parts.password}@127.0.0.1:{proxy.port}/", timeout=2
        )
        try:
            async with start_relay({"rabbitmq": sink}, backoff_base=0.05, backoff_max=0.5):
                # In waves, each after a cut: every wave needs a new connection, however
                # fast the machine delivers, so the flapping really is exercised.
                for wave in range(5):
                    proxy.cut()
                    async with db.transaction():
                        for n in range(wave * 400, (wave + 1) * 400):
                            await enqueue(db, "rabbitmq", _order(broker, n), schema=names.schema)
                    with anyio.fail_after(120):
                        while not await statuses_are(db, names, {"sent": (wave + 1) * 400}):
                            proxy.cut()  # fault injection every 0.3 s, not synchronisation
                            await anyio.sleep(0.3)
        finally:
            await sink.aclose()
    assert proxy.connections > 3
    await collected.drain()
    ids = await db.fetch(f'SELECT id FROM "{names.schema}".intent')
    assert set(collected.ids()) == {str(r["id"]) for r in ids}  # duplicates allowed, no loss


async def test_a_traced_delivery_puts_its_span_in_the_message_headers(
    db, names: Names, start_relay, amqp_url: str, broker: Broker, traces
) -> None:
    sink = RabbitMQSink(amqp_url, timeout=10)
    try:
        async with start_relay({"rabbitmq": sink}, tracer=traces.delivery_tracer):
            with traces.tracer.start_as_current_span("place order") as producer:
                async with db.transaction():
                    for n in range(3):
                        payload = _order(broker, n, headers={"tenant": "acme"})
                        await enqueue(db, "rabbitmq", payload, schema=names.schema)
            await wait_until(lambda: statuses_are(db, names, {"sent": 3}))
    finally:
        await sink.aclose()
    messages = await Collected(broker).drain()
    assert {m.headers["tenant"] for m in messages} == {"acme"}
    traces.assert_carried(
        producer, {int(m.message_id or 0): str(m.headers["traceparent"]) for m in messages}
    )
