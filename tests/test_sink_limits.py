"""Per-kind limits: concurrency cap, rate limit, per-delivery timeout; parsing of --limits."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import anyio
import nats
import pytest

from tests.conftest import count_by_status, statuses_are, wait_until
from worker.errors import ConfigError, Deferred, TransientError
from worker.intent import Intent
from worker.producer import enqueue
from worker.sinks.base import BatchSink, DeliversBatchOfOne
from worker.sinks.handlers import HandlerSink
from worker.sinks.limits import (
    KindLimits,
    LimitedBatchSink,
    LimitedSink,
    apply_limits,
    parse_limits,
)
from worker.sinks.nats.sink import NatsSink
from worker.store.sqlfiles import Names


def _intent(n: int, kind: str = "k") -> Intent:
    now = datetime.now(UTC)
    return Intent(
        id=n, kind=kind, payload={}, attempts=1, max_attempts=5, created_at=now, run_at=now
    )


class Gauge:
    """A handler that records how many deliveries run at once."""

    def __init__(self, hold: float = 0.0) -> None:
        self.now = 0
        self.peak = 0
        self.done = 0
        self.hold = hold

    async def __call__(self, intent: Intent) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            await anyio.sleep(self.hold)  # simulated work, not synchronisation
        finally:
            self.now -= 1
        self.done += 1


def test_parse_limits() -> None:
    limits = parse_limits(" email:rate=10/s ; webhook:concurrency=4,rate=30/min,timeout=2.5s")
    assert limits == {
        "email": KindLimits(rate=10.0, per=1.0),
        "webhook": KindLimits(concurrency=4, rate=30.0, per=60.0, timeout=2.5),
    }
    assert parse_limits(None) == {} and parse_limits("") == {}
    assert parse_limits("nats:rate=2").get("nats") == KindLimits(rate=2.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("email", "expected KIND:key=value"),
        ("email:rate", "expected key=value"),
        ("email:rate=fast", "expected N, N/s"),
        ("email:rate=5/day", "expected N, N/s"),
        ("email:rate=0", "must be a positive number"),
        ("email:concurrency=0", "positive integer"),
        ("email:concurrency=1.5", "positive integer"),
        ("email:timeout=-1", "positive number"),
        ("email:timeout=inf", "positive number"),
        ("email:burst=3", "unknown key 'burst'"),
        ("email:rate=1,rate=2", "rate given twice"),
        ("email:rate=1;email:rate=2", "kind 'email' given twice"),
    ],
)
def test_parse_limits_rejects_bad_input(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_limits(text)


def test_limits_for_an_unknown_kind_are_refused() -> None:
    sinks = {"email": HandlerSink(Gauge())}
    with pytest.raises(ConfigError, match="no sink or handler: sms"):
        apply_limits(sinks, parse_limits("sms:rate=1"))  # type: ignore[arg-type]
    wrapped = apply_limits(sinks, parse_limits("email:rate=1"))  # type: ignore[arg-type]
    assert isinstance(wrapped["email"], LimitedSink)


async def _deliver_or_defer(sink: LimitedSink, intent: Intent, deferred: list[Deferred]) -> None:
    try:
        await sink.deliver(intent)
    except Deferred as exc:
        deferred.append(exc)


async def test_concurrency_cap_defers_the_excess_instead_of_waiting() -> None:
    gauge = Gauge(hold=0.05)
    sink = LimitedSink("k", HandlerSink(gauge), KindLimits(concurrency=3))
    deferred: list[Deferred] = []
    async with anyio.create_task_group() as tg:
        for n in range(10):
            tg.start_soon(_deliver_or_defer, sink, _intent(n), deferred)
        await wait_until(lambda: gauge.now == 3)
        assert sink.saturated()
    assert gauge.done == 3 and gauge.peak == 3
    assert len(deferred) == 7 and "concurrency limit reached" in str(deferred[0])
    assert not sink.saturated()


async def test_rate_limit_defers_beyond_the_bucket_until_it_refills() -> None:
    gauge = Gauge()
    sink = LimitedSink("k", HandlerSink(gauge), KindLimits(rate=20.0))
    deferred: list[Deferred] = []
    for n in range(30):
        await _deliver_or_defer(sink, _intent(n), deferred)
    # A full bucket lets 20 through; the rest are told when a token is due (1/20 s).
    assert gauge.done == 20 and len(deferred) == 10
    assert deferred[0].retry_after == pytest.approx(0.05) and sink.saturated()
    await wait_until(lambda: not sink.saturated(), timeout=5)
    await sink.deliver(_intent(99))
    assert gauge.done == 21


async def test_fractional_rate() -> None:
    gauge = Gauge()
    sink = LimitedSink("k", HandlerSink(gauge), KindLimits(rate=0.5, per=0.1))  # 1 per 0.2 s
    deferred: list[Deferred] = []
    for n in range(2):
        await _deliver_or_defer(sink, _intent(n), deferred)
    assert gauge.done == 1 and deferred[0].retry_after == pytest.approx(0.2)


async def test_timeout_is_transient_and_excludes_the_wait() -> None:
    stuck = anyio.Event()

    async def hang(intent: Intent) -> None:
        if intent.id == 1:
            await stuck.wait()

    sink = LimitedSink("k", HandlerSink(hang), KindLimits(concurrency=1, timeout=0.2))
    with pytest.raises(TransientError, match=r"k delivery timed out after 0.2s"):
        await sink.deliver(_intent(1))
    # A delivery that queued behind a slow one still gets its whole timeout.
    await sink.deliver(_intent(2))


async def test_relay_respects_a_kind_limit_and_leaves_other_kinds_alone(
    db, names: Names, start_relay
) -> None:
    limited, free = Gauge(hold=0.02), Gauge()
    sinks = apply_limits(
        {"limited": HandlerSink(limited), "free": HandlerSink(free)},  # type: ignore[dict-item]
        parse_limits("limited:concurrency=2"),
    )
    async with start_relay(sinks, concurrency=8):
        async with db.transaction():
            for n in range(40):
                await enqueue(db, "limited", {"n": n}, schema=names.schema)
                await enqueue(db, "free", {"n": n}, schema=names.schema)
        await wait_until(lambda: _all_sent(db, names, 80), timeout=60)
    assert limited.peak == 2 and limited.done == 40 and free.done == 40


async def test_relay_retries_a_delivery_that_hit_the_kind_timeout(
    db, names: Names, start_relay
) -> None:
    calls = 0

    async def slow_once(intent: Intent) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await anyio.sleep_forever()

    sinks = apply_limits(
        {"slow": HandlerSink(slow_once)},  # type: ignore[dict-item]
        parse_limits("slow:timeout=0.2"),
    )
    async with start_relay(sinks):
        async with db.transaction():
            intent_id = await enqueue(db, "slow", {}, schema=names.schema)
        await wait_until(lambda: _all_sent(db, names, 1))
    row = await db.fetchrow(
        f'SELECT attempts, last_error FROM "{names.schema}".intent WHERE id = $1', intent_id
    )
    assert row["attempts"] == 2
    assert row["last_error"] == "slow delivery timed out after 0.2s (--limits)"


async def _all_sent(db, names: Names, n: int) -> bool:
    return await count_by_status(db, names) == {"sent": n}


async def test_a_kind_at_its_limit_never_holds_up_other_kinds(db, names, start_relay):
    """Invariant: a backlog of a limited kind does not occupy the relay's slots; other kinds
    flow past it, and the deferrals cost the limited intents no attempts."""
    from tests.conftest import Recorder, wait_until
    from worker.producer import enqueue
    from worker.sinks.handlers import HandlerSink
    from worker.sinks.limits import KindLimits, LimitedSink

    release = anyio.Event()

    async def blocked(_intent):
        await release.wait()

    limited = Recorder(blocked)
    free = Recorder()
    sinks = {
        "limited": LimitedSink("limited", HandlerSink(limited), KindLimits(concurrency=1)),
        "free": HandlerSink(free),
    }
    async with start_relay(sinks, concurrency=4):
        async with db.transaction():
            backlog = [
                await enqueue(db, "limited", {"n": n}, schema=names.schema) for n in range(10)
            ]
            others = [await enqueue(db, "free", {"n": n}, schema=names.schema) for n in range(5)]
        await wait_until(lambda: all(free.calls[i] == 1 for i in others))
        assert sum(limited.calls.values()) == 1  # one in flight, the rest waiting in the table
        release.set()
        await wait_until(lambda: all(limited.calls[i] == 1 for i in backlog), timeout=30)
    rows = await db.fetch(
        f'SELECT status, attempts FROM "{names.schema}".intent WHERE id = ANY($1)', backlog
    )
    assert {(r["status"], r["attempts"]) for r in rows} == {("sent", 1)}


# --- batch sinks: a chunk takes its tokens at once ----------------------------------------


class ChunkGauge(DeliversBatchOfOne):
    """A batch sink that records the chunks it gets and how many intents are in flight at
    once; it holds each chunk until ``gate`` is set (if given) or for ``hold`` seconds."""

    def __init__(self, max_batch: int = 128, hold: float = 0.0) -> None:
        self.max_batch = max_batch
        self.hold = hold
        self.gate: anyio.Event | None = None
        self.chunks: list[int] = []
        self.now = 0
        self.peak = 0
        self.done = 0

    async def deliver_many(self, intents: Sequence[Intent]) -> Sequence[BaseException | None]:
        self.chunks.append(len(intents))
        self.now += len(intents)
        self.peak = max(self.peak, self.now)
        try:
            if self.gate is not None:
                await self.gate.wait()
            else:
                await anyio.sleep(self.hold)  # simulated work, not synchronisation
        finally:
            self.now -= len(intents)
        self.done += len(intents)
        return [None] * len(intents)

    async def aclose(self) -> None:
        pass


def _intents(first: int, count: int) -> list[Intent]:
    return [_intent(n, "b") for n in range(first, first + count)]


def _deferred(results: Sequence[BaseException | None]) -> list[Deferred]:
    return [r for r in results if isinstance(r, Deferred)]


def test_a_limited_batch_sink_stays_a_batch_sink_no_bigger_than_its_limits() -> None:
    def wrap(sink: Any, text: str) -> Any:
        return apply_limits({"b": sink}, parse_limits(text))["b"]

    wrapped = wrap(ChunkGauge(max_batch=128), "b:concurrency=64")
    assert isinstance(wrapped, LimitedBatchSink) and isinstance(wrapped, BatchSink)
    assert wrapped.max_batch == 64
    assert wrap(ChunkGauge(max_batch=128), "b:timeout=5").max_batch == 128
    # A bucket of 10 tokens never grants a chunk of more than 10.
    assert wrap(ChunkGauge(max_batch=128), "b:rate=10/s").max_batch == 10
    assert wrap(ChunkGauge(max_batch=8), "b:concurrency=64").max_batch == 8
    # A sink that does not batch keeps being handed one intent at a time.
    assert not isinstance(wrap(HandlerSink(Gauge()), "b:concurrency=4"), BatchSink)


async def test_concurrency_counts_every_intent_of_a_chunk_and_defers_the_excess() -> None:
    inner = ChunkGauge()
    inner.gate = anyio.Event()
    sink = LimitedBatchSink("b", inner, KindLimits(concurrency=5))
    results: dict[str, Sequence[BaseException | None]] = {}

    async def call(name: str, intents: list[Intent]) -> None:
        results[name] = await sink.deliver_many(intents)

    async with anyio.create_task_group() as tg:
        tg.start_soon(call, "first", _intents(0, 3))
        await wait_until(lambda: inner.now == 3)
        assert not sink.saturated()
        tg.start_soon(call, "second", _intents(3, 4))  # 2 slots left: 2 go, 2 are deferred
        await wait_until(lambda: inner.now == 5)
        assert sink.saturated()
        full = await sink.deliver_many(_intents(7, 2))  # answers at once: no slot left
        assert len(_deferred(full)) == 2 and "concurrency limit reached" in str(full[0])
        inner.gate.set()
    assert results["first"] == [None] * 3
    assert results["second"][:2] == [None, None] and len(_deferred(results["second"])) == 2
    assert inner.chunks == [3, 2] and inner.peak == 5 and inner.done == 5
    assert not sink.saturated()


async def test_rate_tokens_are_taken_per_intent_of_a_chunk() -> None:
    # 20 per minute: a bucket of 20, refilled one token every 3 s (nothing refills mid-test).
    inner = ChunkGauge()
    sink = LimitedBatchSink("b", inner, KindLimits(rate=20.0, per=60.0))
    # A chunk bigger than the bucket (aiolimiter refuses such an amount) is cut, not refused.
    results = await sink.deliver_many(_intents(0, 30))
    assert results[:20] == [None] * 20
    deferred = _deferred(results)
    assert len(deferred) == 10 and deferred[0].retry_after == pytest.approx(3.0)
    assert "rate limit reached" in str(deferred[0])
    assert inner.chunks == [20] and sink.saturated()
    assert _deferred(await sink.deliver_many(_intents(30, 5))) and inner.done == 20


async def test_the_kind_timeout_covers_the_chunk_and_frees_its_slots() -> None:
    inner = ChunkGauge()
    inner.gate = anyio.Event()  # never set: the chunk hangs
    sink = LimitedBatchSink("b", inner, KindLimits(concurrency=3, timeout=0.2))
    results = await sink.deliver_many(_intents(0, 3))
    assert all(isinstance(r, TransientError) for r in results)
    assert str(results[0]) == "b delivery timed out after 0.2s (--limits)"
    assert not sink.saturated() and inner.now == 0


async def test_relay_hands_a_limited_batch_sink_chunks_within_its_concurrency(
    db, names: Names, start_relay
) -> None:
    inner = ChunkGauge(hold=0.02)
    sinks = apply_limits({"b": inner}, parse_limits("b:concurrency=4"))  # type: ignore[dict-item]
    async with start_relay(sinks, concurrency=16) as relay:
        async with db.transaction():
            for n in range(40):
                await enqueue(db, "b", {"n": n}, schema=names.schema)
        await wait_until(lambda: _all_sent(db, names, 40), timeout=60)
    # The first claim takes 16: one chunk of 4 runs, the other 12 are deferred.
    assert max(inner.chunks) == 4 and inner.peak == 4 and inner.done == 40
    assert relay.stats.released["b"] >= 12
    rows = await db.fetch(f'SELECT attempts FROM "{names.schema}".intent')
    assert {r["attempts"] for r in rows} == {1}  # a deferral costs no attempt


async def test_relay_defers_what_a_chunk_gets_no_rate_tokens_for(
    db, names: Names, start_relay
) -> None:
    inner = ChunkGauge()
    # A bucket of 10 that refills one token every 6 minutes: exactly 10 can go.
    sinks = apply_limits({"b": inner}, parse_limits("b:rate=10/h"))  # type: ignore[dict-item]
    async with start_relay(sinks, concurrency=16) as relay:
        async with db.transaction():
            for n in range(30):
                await enqueue(db, "b", {"n": n}, schema=names.schema)
        await wait_until(lambda: statuses_are(db, names, {"sent": 10, "pending": 20}))
        assert relay.stats.released["b"] >= 6  # the part of the first claim past the bucket
    assert inner.chunks[0] == 10 and inner.done == 10
    rows = await db.fetch(
        f"SELECT attempts FROM \"{names.schema}\".intent WHERE status = 'pending'"
    )
    assert {r["attempts"] for r in rows} == {0}


class ChunkCountingNats(NatsSink):
    """The real NATS sink, recording the size of each chunk the relay hands it."""

    chunks: list[int]

    async def deliver_many(self, intents: Sequence[Intent]) -> list[BaseException | None]:
        self.chunks.append(len(intents))
        return await super().deliver_many(intents)


async def test_nats_under_limits_still_publishes_in_chunks(
    db, names: Names, start_relay, nats_url: str
) -> None:
    client = await nats.connect(nats_url)
    js = client.jetstream()
    stream = f"OUTBOX_TEST_{secrets.token_hex(4)}"
    await js.add_stream(name=stream, subjects=[f"{stream.lower()}.>"])
    nats_sink = ChunkCountingNats(nats_url, timeout=5)
    nats_sink.chunks = []
    try:
        sinks = apply_limits({"nats": nats_sink}, parse_limits("nats:concurrency=64"))
        assert isinstance(sinks["nats"], BatchSink)
        async with start_relay(sinks, concurrency=64):
            await db.execute(
                f'INSERT INTO "{names.schema}".intent (kind, payload) '
                "SELECT 'nats', jsonb_build_object('subject', $1::text, 'body', n) "
                "FROM generate_series(1, 300) AS n",
                f"{stream.lower()}.orders",
            )
            await wait_until(lambda: _all_sent(db, names, 300), timeout=60)
        assert (await js.stream_info(stream)).state.messages == 300
        assert max(nats_sink.chunks) > 1 and max(nats_sink.chunks) <= 64
    finally:
        await nats_sink.aclose()
        await js.delete_stream(stream)
        await client.close()
