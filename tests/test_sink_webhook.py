"""The webhook sink against a real HTTP server (aiohttp.web, started by each test).

The receiver listens on 127.0.0.1, which the sink refuses by default: the sinks here allow
private destinations (``allow_private=True``) or name the host in the allow-list;
tests/test_webhook_guard.py covers the refusal."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import anyio
import orjson
import pytest
from aiohttp import web

from tests.conftest import failed_at_least_once, statuses_are, wait_until
from tests.tcp_proxy import free_port
from worker.errors import ConfigError, PermanentError, TransientError
from worker.intent import Intent
from worker.producer import enqueue
from worker.sinks.webhook.sink import (
    WebhookSink,
    build_request,
    host_allowed,
    parse_allow_hosts,
    parse_retry_after,
    sign,
)
from worker.store.sqlfiles import Names

SECRET = "whsec-test-0123456789"


def verify_signature(secret: str, header: str, body: bytes, tolerance: float = 300) -> bool:
    """What a receiver does (docs/kinds/webhook.md shows the same code)."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        timestamp = int(parts["t"])
        received = parts["v1"]
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > tolerance:
        return False  # too old: a replay
    signed = f"{timestamp}.".encode() + body
    expected = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, received)


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    peer: Any
    at: float


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: str = "ok"
    delay: float = 0.0
    drop: bool = False  # close the connection without an answer


class Receiver:
    """A local HTTP server that records requests and answers from a script (then 200)."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.script: deque[Reply] = deque()
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(
            Received(
                request.method,
                request.path_qs,
                dict(request.headers),
                body,
                request.transport.get_extra_info("peername") if request.transport else None,
                time.monotonic(),
            )
        )
        reply = self.script.popleft() if self.script else Reply()
        if reply.drop and request.transport is not None:
            request.transport.close()
        if reply.delay:
            await anyio.sleep(reply.delay)  # a slow receiver, not synchronisation
        return web.Response(status=reply.status, headers=reply.headers, text=reply.body)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        if not self.port:
            self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def keys(self) -> list[str]:
        return [r.headers["Idempotency-Key"] for r in self.requests]


@pytest.fixture(name="receiver")  # imported by other modules under its function's name
async def webhook_receiver() -> AsyncIterator[Receiver]:
    server = Receiver()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def sink() -> AsyncIterator[WebhookSink]:
    webhook = WebhookSink(secret=SECRET, allow_private=True, timeout=5.0, max_retry_after=30.0)
    try:
        yield webhook
    finally:
        await webhook.aclose()


def _intent(payload: Any, n: int = 7) -> Intent:
    now = datetime.now(UTC)
    return Intent(
        id=n, kind="webhook", payload=payload, attempts=1, max_attempts=5, created_at=now,
        run_at=now,
    )  # fmt: skip


# --- pure parts ------------------------------------------------------------------------------


def test_signature_verifies_and_detects_tampering() -> None:
    body = b'{"order": 42}'
    header = sign(SECRET, int(time.time()), body)
    assert verify_signature(SECRET, header, body)
    assert not verify_signature(SECRET, header, b'{"order": 43}')
    assert not verify_signature("another-secret", header, body)
    old = sign(SECRET, int(time.time()) - 3600, body)
    assert not verify_signature(SECRET, old, body)


def test_allow_list_matching() -> None:
    patterns = parse_allow_hosts("API.example.com, *.hooks.example.net.")
    assert patterns == ("api.example.com", "*.hooks.example.net")
    assert host_allowed("api.example.com", patterns)
    assert host_allowed("a.b.hooks.example.net", patterns)
    assert not host_allowed("hooks.example.net", patterns)
    assert not host_allowed("evil-hooks.example.net", patterns)
    assert not host_allowed("api.example.com.evil.org", patterns)
    assert host_allowed("anything.org", ())
    for bad in ("https://api.example.com", "api.example.com:443", "*", "a/b"):
        with pytest.raises(ConfigError, match="not a host name"):
            parse_allow_hosts(bad)


def test_retry_after_forms() -> None:
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490.0) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([1, 2], "must be a JSON object"),
        ({"body": {}}, "needs 'url'"),
        ({"url": "ftp://x.example/"}, "http:// or https://"),
        ({"url": "https://user:pw@x.example/"}, "must not contain credentials"),
        ({"url": "https://x.example/", "method": "TRACE"}, "not one of DELETE, PATCH"),
        ({"url": "https://x.example/", "headers": {"X-A": "1\r\nX-B: 2"}}, "line break"),
        ({"url": "https://x.example/", "headers": {"Idempotency-Key": "mine"}}, "set by the"),
        ({"url": "https://x.example/", "headers": {"Bad Name": "1"}}, "not a valid token"),
        ({"url": "https://x.example/", "headers": {"X-N": 1}}, "must be a string"),
        ({"url": "https://x.example/", "data": {}}, "unknown field"),
        ({"url": "https://other.example/"}, "not in --webhook-allow-hosts"),
    ],
)
def test_bad_payloads_are_permanent(payload: Any, message: str) -> None:
    with pytest.raises(PermanentError, match=message):
        build_request(_intent(payload), ("x.example",))


def test_secret_never_in_repr() -> None:
    assert SECRET not in repr(WebhookSink(secret=SECRET))


# --- against the server ----------------------------------------------------------------------


async def test_request_carries_body_key_and_a_valid_signature(
    receiver: Receiver, sink: WebhookSink
) -> None:
    payload = {"url": f"{receiver.url}/hooks/orders?x=1", "body": {"order": 42, "é": [1, 2]}}
    await sink.deliver(_intent(payload, n=42))
    [got] = receiver.requests
    assert (got.method, got.path) == ("POST", "/hooks/orders?x=1")
    assert orjson.loads(got.body) == {"order": 42, "é": [1, 2]}
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["Idempotency-Key"] == "42"
    assert verify_signature(SECRET, got.headers["Outbox-Signature"], got.body)


async def test_method_and_headers_from_the_payload(receiver: Receiver) -> None:
    webhook = WebhookSink(id_prefix="shop-", allow_private=True)  # no secret: no signature
    try:
        await webhook.deliver(
            _intent({"url": receiver.url, "method": "put", "headers": {"X-Trace": "abc"}})
        )
    finally:
        await webhook.aclose()
    [got] = receiver.requests
    assert got.method == "PUT" and got.body == b""
    assert got.headers["X-Trace"] == "abc" and got.headers["Idempotency-Key"] == "shop-7"
    assert "Outbox-Signature" not in got.headers and "Content-Type" not in got.headers


async def test_connections_are_reused(receiver: Receiver, sink: WebhookSink) -> None:
    for n in range(20):
        await sink.deliver(_intent({"url": receiver.url, "body": n}, n=n))
    assert len(receiver.requests) == 20
    assert len({r.peer for r in receiver.requests}) == 1


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503])
async def test_retryable_statuses_are_transient_and_honour_retry_after(
    receiver: Receiver, sink: WebhookSink, status: int
) -> None:
    receiver.script.append(Reply(status, {"Retry-After": "7"}, "busy, come back"))
    with pytest.raises(TransientError, match=f"POST http://127.0.0.1:.*: HTTP {status}: busy") as e:
        await sink.deliver(_intent({"url": f"{receiver.url}/secret-token-in-path"}))
    assert e.value.retry_after == 7.0
    assert "secret-token-in-path" not in str(e.value)


async def test_retry_after_is_capped(receiver: Receiver, sink: WebhookSink) -> None:
    receiver.script.append(Reply(429, {"Retry-After": "999999"}))
    with pytest.raises(TransientError) as e:
        await sink.deliver(_intent({"url": receiver.url}))
    assert e.value.retry_after == 30.0


@pytest.mark.parametrize("status", [400, 401, 404, 409, 422, 302])
async def test_other_statuses_are_permanent(
    receiver: Receiver, sink: WebhookSink, status: int
) -> None:
    receiver.script.append(Reply(status, {"Location": f"{receiver.url}/elsewhere"}, "nope"))
    with pytest.raises(PermanentError, match=f"HTTP {status}"):
        await sink.deliver(_intent({"url": receiver.url}))
    assert len(receiver.requests) == 1  # a redirect is not followed


async def test_slow_receiver_times_out_as_transient(receiver: Receiver) -> None:
    receiver.script.append(Reply(delay=5.0))
    webhook = WebhookSink(allow_private=True, timeout=0.3)
    try:
        with pytest.raises(TransientError, match=r"no response within 0\.3s"):
            await webhook.deliver(_intent({"url": receiver.url}))
    finally:
        await webhook.aclose()


async def test_connection_dropped_without_an_answer_is_transient(
    receiver: Receiver, sink: WebhookSink
) -> None:
    receiver.script.append(Reply(drop=True))
    with pytest.raises(TransientError, match="ServerDisconnectedError") as e:
        await sink.deliver(_intent({"url": f"{receiver.url}/hook/tok-3141"}))
    assert "tok-3141" not in str(e.value)
    await sink.deliver(_intent({"url": f"{receiver.url}/hook/tok-3141"}))  # the retry
    assert len(receiver.requests) == 2


async def test_unreachable_host_is_transient(sink: WebhookSink) -> None:
    with pytest.raises(TransientError, match="cannot connect"):
        await sink.deliver(_intent({"url": f"http://127.0.0.1:{free_port()}/"}))


# --- through the relay -----------------------------------------------------------------------


async def test_relay_delivers_webhooks_end_to_end(
    db, names: Names, start_relay, receiver: Receiver, sink: WebhookSink
) -> None:
    async with start_relay({"webhook": sink}):
        async with db.transaction():
            ids = [
                await enqueue(
                    db, "webhook", {"url": receiver.url, "body": {"n": n}}, schema=names.schema
                )
                for n in range(10)
            ]
        await wait_until(lambda: statuses_are(db, names, {"sent": 10}))
    assert sorted(receiver.keys()) == sorted(str(i) for i in ids)
    assert all(
        verify_signature(SECRET, r.headers["Outbox-Signature"], r.body) for r in receiver.requests
    )


async def test_unknown_host_is_dead_at_once_and_unreachable_host_is_retried(
    db, names: Names, start_relay, receiver: Receiver
) -> None:
    closed_port = free_port()
    webhook = WebhookSink(allow_hosts=parse_allow_hosts("127.0.0.1"), timeout=2.0)
    try:
        async with start_relay({"webhook": webhook}):
            async with db.transaction():
                not_allowed = await enqueue(
                    db, "webhook", {"url": "https://evil.example/"}, schema=names.schema
                )
                unreachable = await enqueue(
                    db,
                    "webhook",
                    {"url": f"http://127.0.0.1:{closed_port}/"},
                    schema=names.schema,
                    max_attempts=2,
                )
            await wait_until(lambda: statuses_are(db, names, {"dead": 2}))
    finally:
        await webhook.aclose()
    rows = {
        r["id"]: r
        for r in await db.fetch(f'SELECT id, attempts, last_error FROM "{names.schema}".intent')
    }
    assert rows[not_allowed]["attempts"] == 1
    assert rows[not_allowed]["last_error"] == (
        "webhook host 'evil.example' is not in --webhook-allow-hosts"
    )
    assert rows[unreachable]["attempts"] == 2
    assert rows[unreachable]["last_error"].startswith("attempts exhausted (2/2); last: POST ")
    assert "cannot connect" in rows[unreachable]["last_error"]


async def test_receiver_down_then_back_loses_nothing(
    db, names: Names, start_relay, receiver: Receiver, sink: WebhookSink
) -> None:
    await receiver.stop()  # same port, nobody listening
    async with start_relay({"webhook": sink}, backoff_base=0.1, backoff_max=0.5):
        async with db.transaction():
            for n in range(20):
                await enqueue(db, "webhook", {"url": receiver.url, "body": n}, schema=names.schema)
        await wait_until(lambda: failed_at_least_once(db, names, 20))
        await receiver.start()
        await wait_until(lambda: statuses_are(db, names, {"sent": 20}), timeout=30)
    assert len(set(receiver.keys())) == 20
    assert sorted(orjson.loads(r.body) for r in receiver.requests) == list(range(20))


async def test_relay_waits_for_retry_after(
    db, names: Names, start_relay, receiver: Receiver, sink: WebhookSink
) -> None:
    receiver.script.append(Reply(503, {"Retry-After": "1"}, "maintenance"))
    async with start_relay({"webhook": sink}):
        async with db.transaction():
            await enqueue(db, "webhook", {"url": receiver.url}, schema=names.schema)
        await wait_until(lambda: statuses_are(db, names, {"sent": 1}))
    first, second = receiver.requests
    assert second.headers["Idempotency-Key"] == first.headers["Idempotency-Key"]
    assert second.at - first.at >= 0.9  # the backoff alone would have been <= 0.2 s


async def test_bad_status_is_dead_with_the_reason(
    db, names: Names, start_relay, receiver: Receiver, sink: WebhookSink
) -> None:
    receiver.script.append(Reply(422, body='{"error": "amount must be positive"}'))
    async with start_relay({"webhook": sink}):
        async with db.transaction():
            intent_id = await enqueue(db, "webhook", {"url": receiver.url}, schema=names.schema)
        await wait_until(lambda: statuses_are(db, names, {"dead": 1}))
    error = await db.fetchval(
        f'SELECT last_error FROM "{names.schema}".intent WHERE id = $1', intent_id
    )
    assert error == (
        f'POST http://127.0.0.1:{receiver.port}: HTTP 422: {{"error": "amount must be positive"}}'
    )


# --- trace context -----------------------------------------------------------------------------

PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_the_intents_trace_context_replaces_the_payloads(sink: WebhookSink) -> None:
    payload = {"url": "http://127.0.0.1/h", "headers": {"TraceParent": "mine", "X-Tenant": "a"}}
    plain = _intent(payload)
    assert sink.headers_for(plain, build_request(plain))["TraceParent"] == "mine"
    traced = replace(plain, trace_context={"traceparent": PARENT, "tracestate": "a=1"})
    headers = sink.headers_for(traced, build_request(traced))
    assert "TraceParent" not in headers and headers["X-Tenant"] == "a"
    assert (headers["traceparent"], headers["tracestate"]) == (PARENT, "a=1")
    assert payload["headers"] == {"TraceParent": "mine", "X-Tenant": "a"}  # left as it was


async def test_a_traced_delivery_sends_its_span_as_the_receivers_parent(
    db, names: Names, start_relay, receiver: Receiver, sink: WebhookSink, traces
) -> None:
    async with start_relay({"webhook": sink}, tracer=traces.delivery_tracer):
        with traces.tracer.start_as_current_span("place order") as producer:
            async with db.transaction():
                for n in range(3):
                    payload = {"url": receiver.url, "body": {"n": n}}
                    await enqueue(db, "webhook", payload, schema=names.schema)
        await wait_until(lambda: statuses_are(db, names, {"sent": 3}))
    traces.assert_carried(
        producer,
        {int(r.headers["Idempotency-Key"]): r.headers["traceparent"] for r in receiver.requests},
    )


async def test_untraced_the_producers_context_is_passed_on_and_none_is_added(
    db, names: Names, start_relay, receiver: Receiver, sink: WebhookSink
) -> None:
    context = {"traceparent": PARENT, "tracestate": "congo=t61rcWkgMzE"}
    async with start_relay({"webhook": sink}):
        async with db.transaction():
            payload = {"url": receiver.url}
            with_context = await enqueue(
                db, "webhook", payload, trace_context=context, schema=names.schema
            )
            without = await enqueue(db, "webhook", payload, schema=names.schema)
        await wait_until(lambda: statuses_are(db, names, {"sent": 2}))
    by_id = {int(r.headers["Idempotency-Key"]): r.headers for r in receiver.requests}
    assert (by_id[with_context]["traceparent"], by_id[with_context]["tracestate"]) == (
        PARENT,
        "congo=t61rcWkgMzE",
    )
    assert not {"traceparent", "tracestate"} & {h.lower() for h in by_id[without]}
