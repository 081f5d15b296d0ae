"""Trace context end to end: what producers store, the delivery spans (the SDK's in-memory
exporter), the switch that turns them on, and a worker that imports no OpenTelemetry while
it is off. What each sink carries is tested beside the sink (tests/test_sink_*.py)."""

from __future__ import annotations

import shlex
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import orjson
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from tests.conftest import statuses_are, wait_until
from tests.docs_text import doc_snippet
from tests.test_cli import REPO, _env, _sigterm_and_wait
from tests.tracing_helpers import Traces, traceparent
from worker.distribution import pip_install
from worker.errors import PermanentError, TransientError
from worker.intent import Intent
from worker.observe.tracing import tracing_wanted
from worker.producer import enqueue
from worker.store.sqlfiles import Names

PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
STATE = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"


async def _contexts(db: asyncpg.Connection, names: Names) -> dict[int, Any]:
    rows = await db.fetch(f'SELECT id, trace_context FROM "{names.schema}".intent')
    return {r["id"]: r["trace_context"] and orjson.loads(r["trace_context"]) for r in rows}


# --- producers ---------------------------------------------------------------------------------


async def test_enqueue_takes_the_current_spans_context(db, names: Names, traces: Traces) -> None:
    s = names.schema
    outside = await enqueue(db, "job", {}, schema=s)
    with traces.tracer.start_as_current_span("checkout") as span:
        inside = await enqueue(db, "job", {}, schema=s)
        opted_out = await enqueue(db, "job", {}, trace_context={}, schema=s)
        explicit = await enqueue(db, "job", {}, trace_context={"traceparent": PARENT}, schema=s)
    remote = TraceContextTextMapPropagator().extract({"traceparent": PARENT, "tracestate": STATE})
    with traces.tracer.start_as_current_span("child", context=remote) as child:
        with_state = await enqueue(db, "job", {}, schema=s)
    stored = await _contexts(db, names)
    assert stored[outside] is None and stored[opted_out] is None
    assert stored[inside] == {"traceparent": traceparent(span.get_span_context())}
    assert stored[explicit] == {"traceparent": PARENT}
    child_ids = child.get_span_context()
    assert stored[with_state] == {"traceparent": traceparent(child_ids), "tracestate": STATE}
    assert child_ids.trace_id == int(PARENT.split("-")[1], 16)


async def test_plain_sql_enqueue_stores_a_valid_trace_context(db, names: Names) -> None:
    s = f'"{names.schema}"'
    context = {"traceparent": PARENT, "tracestate": STATE}
    intent_id = await db.fetchval(
        f"SELECT {s}.enqueue('job', '{{}}', trace_context => $1::text::jsonb)",
        orjson.dumps(context).decode(),
    )
    plain = await db.fetchval(f"SELECT {s}.enqueue('job', '{{}}')")
    assert await _contexts(db, names) == {intent_id: context, plain: None}


@pytest.mark.parametrize(
    "context",
    [
        {},  # no traceparent
        {"tracestate": STATE},
        {"traceparent": PARENT, "baggage": "k=v"},  # only the W3C trace context
        {"traceparent": PARENT.upper()},  # lower-case hex only
        {"traceparent": PARENT[:-1]},
        {"traceparent": "ff" + PARENT[2:]},  # version ff is invalid
        {"traceparent": "00-" + "0" * 32 + PARENT[35:]},  # all-zero trace id
        {"traceparent": PARENT[:36] + "0" * 16 + "-01"},  # all-zero parent id
        {"traceparent": 7},
        {"traceparent": PARENT, "tracestate": "a=1\r\nX-Injected: yes"},  # would split a header
        {"traceparent": PARENT, "tracestate": "a=" + "x" * 511},  # over W3C's 512 characters
        {"traceparent": PARENT, "tracestate": ["a=1"]},
        [PARENT],
        PARENT,
    ],
)
async def test_a_malformed_trace_context_is_refused_at_enqueue(
    db, names: Names, context: Any
) -> None:
    with pytest.raises(asyncpg.CheckViolationError, match="intent_trace_context_valid"):
        await db.fetchval(
            f"SELECT \"{names.schema}\".enqueue('job', '{{}}', trace_context => $1::text::jsonb)",
            orjson.dumps(context).decode(),
        )


# --- delivery spans ----------------------------------------------------------------------------


async def test_delivery_span_is_a_child_of_the_producers_span(
    db, names: Names, start_relay, traces: Traces
) -> None:
    seen: dict[int, Any] = {}

    async def handler(intent: Intent) -> None:
        seen[intent.id] = intent.trace_context
        with traces.tracer.start_as_current_span("charge card"):
            pass

    async with start_relay({"job": handler}, tracer=traces.delivery_tracer):
        with traces.tracer.start_as_current_span("place order") as producer:
            async with db.transaction():
                intent_id = await enqueue(db, "job", {"n": 1}, schema=names.schema)
        await wait_until(lambda: statuses_are(db, names, {"sent": 1}))
    traces.assert_carried(producer, {intent_id: seen[intent_id]["traceparent"]})
    span = traces.delivery_of(intent_id)
    assert span.name == "outbox deliver job" and span.kind == SpanKind.PRODUCER
    assert dict(span.attributes or {}) == {
        "outbox.kind": "job",
        "outbox.intent.id": intent_id,
        "outbox.attempt": 1,
        "outbox.outcome": "sent",
    }
    assert span.status.status_code == StatusCode.UNSET
    # The handler ran with the delivery span as the current one: its spans are children.
    [own] = [s for s in traces.exporter.get_finished_spans() if s.name == "charge card"]
    assert own.parent is not None and own.parent.span_id == span.context.span_id


async def test_failed_deliveries_are_error_spans_with_their_outcome(
    db, names: Names, start_relay, traces: Traces
) -> None:
    async def flaky(intent: Intent) -> None:
        if intent.attempts == 1:
            raise TransientError("busy, try later")

    async def broken(_intent: Intent) -> None:
        raise PermanentError("no such customer")

    async def hangs(_intent: Intent) -> None:
        await anyio.sleep(3600)

    sinks = {"flaky": flaky, "broken": broken, "hangs": hangs}
    async with start_relay(sinks, tracer=traces.delivery_tracer, delivery_timeout=0.5):
        async with db.transaction():
            ids = {kind: await enqueue(db, kind, {}, schema=names.schema) for kind in sinks}
            ids["hangs"] = await enqueue(db, "hangs", {}, max_attempts=1, schema=names.schema)
            ids["nosuch"] = await enqueue(db, "nosuch", {}, schema=names.schema)
        await wait_until(lambda: statuses_are(db, names, {"sent": 1, "dead": 4}))
    spans: dict[int, list[Any]] = {}
    for span in traces.deliveries():
        spans.setdefault(span.attributes["outbox.intent.id"], []).append(span)

    def summary(intent_id: int) -> list[tuple[Any, ...]]:
        return [
            (s.attributes["outbox.outcome"], s.status.status_code, s.status.description)
            for s in spans[intent_id]
        ]

    retry, sent = spans[ids["flaky"]]
    assert summary(ids["flaky"]) == [
        ("retry", StatusCode.ERROR, "busy, try later"),
        ("sent", StatusCode.UNSET, None),
    ]
    assert (retry.attributes["outbox.attempt"], sent.attributes["outbox.attempt"]) == (1, 2)
    assert retry.attributes["outbox.retry_delay"] > 0
    assert summary(ids["broken"]) == [("dead", StatusCode.ERROR, "no such customer")]
    [(outcome, status, why)] = summary(ids["hangs"])
    assert (outcome, status) == ("dead", StatusCode.ERROR) and "timed out after 0.5s" in why
    [(outcome, status, why)] = summary(ids["nosuch"])
    assert (outcome, status) == ("dead", StatusCode.ERROR) and "unknown kind 'nosuch'" in why
    # No producer context: each delivery starts a trace of its own.
    assert all(s.parent is None for group in spans.values() for s in group)


async def test_a_delivery_cancelled_at_shutdown_ends_its_span_as_released(
    db, names: Names, start_relay, traces: Traces
) -> None:
    async def hangs(_intent: Intent) -> None:
        await anyio.sleep(3600)

    async with start_relay({"hangs": hangs}, tracer=traces.delivery_tracer, grace=0.2):
        intent_id = await enqueue(db, "hangs", {}, schema=names.schema)
        await wait_until(lambda: statuses_are(db, names, {"processing": 1}))
    # Stopped: the grace period ran out, the delivery was cancelled, its row handed back.
    assert await statuses_are(db, names, {"pending": 1})
    span = traces.delivery_of(intent_id)
    assert span.attributes["outbox.outcome"] == "released" and span.end_time is not None


# --- the switch --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "wanted"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, False),  # no exporter named
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "none, console"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "TRUE"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "false"}, True),
    ],
)
def test_tracing_is_on_when_the_otel_variables_name_an_exporter(
    environ: dict[str, str], wanted: bool
) -> None:
    assert tracing_wanted(environ) is wanted


def test_without_the_extra_a_traced_environment_only_warns() -> None:
    """The otel packages cannot be imported: one warning with the install command, no spans."""
    code = (
        "import logging, sys; logging.basicConfig(); sys.modules['opentelemetry'] = None\n"
        "from worker.observe.tracing import from_env\n"
        "print(from_env({'OTEL_TRACES_EXPORTER': 'otlp'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO,
        env=_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "None"
    assert (
        "OTEL_TRACES_EXPORTER is set but the 'otel' extra is not installed (opentelemetry is "
        "missing): deliveries are not traced; pip install 'pg-outbox-relay[otel]'"
    ) in result.stderr


def _worker(pg_dsn: str, schema: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """``python -m worker`` with the probe handler (tests/otel_probe.py) and only the OTEL_*
    variables of ``env``."""
    clean = {k: v for k, v in _env().items() if not k.startswith("OTEL_")}
    argv = ["run", "--dsn", pg_dsn, "--schema", schema, "--handlers", "tests.otel_probe:handlers"]
    return subprocess.Popen(
        [sys.executable, "-m", "worker", *argv, "--poll-interval", "0.5", "--no-dashboard"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**clean, **env},
        cwd=REPO,
    )  # fmt: skip


async def run_probe(
    pg_dsn: str, db: asyncpg.Connection, names: Names, tmp_path: Path, env: dict[str, str]
) -> dict[str, Any]:
    """A worker (its OTEL_* variables: ``env``) delivers one ``probe`` intent that the
    producer enqueued with trace context PARENT; what the handler saw."""
    out = tmp_path / "probe.json"
    await db.fetchval(
        f"SELECT \"{names.schema}\".enqueue('probe', $1::text::jsonb, "
        "trace_context => $2::text::jsonb)",
        orjson.dumps({"out": str(out)}).decode(),
        orjson.dumps({"traceparent": PARENT, "tracestate": STATE}).decode(),
    )
    proc = _worker(pg_dsn, names.schema, env)
    try:
        await wait_until(lambda: statuses_are(db, names, {"sent": 1}), timeout=60)
        await _sigterm_and_wait(proc)
    finally:
        proc.kill()
    output = proc.stdout.read() if proc.stdout else ""
    assert proc.returncode == 0, output
    seen: dict[str, Any] = orjson.loads(out.read_bytes())
    return seen


@pytest.mark.parametrize(
    "env",
    [{}, {"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}],
    ids=["no OTEL variables", "OTEL_SDK_DISABLED"],
)
async def test_a_worker_that_does_not_trace_imports_no_opentelemetry(
    pg_dsn: str, db, names: Names, tmp_path: Path, env: dict[str, str]
) -> None:
    seen = await run_probe(pg_dsn, db, names, tmp_path, env)
    assert seen["opentelemetry_modules"] == []
    # The producer's context goes to the sink as it was enqueued.
    assert seen["trace_context"] == {"traceparent": PARENT, "tracestate": STATE}


class OtlpReceiver:
    """An OTLP/HTTP endpoint (what a collector listens on at :4318) that keeps every span."""

    def __init__(self) -> None:
        self.spans: list[Any] = []  # opentelemetry.proto Span messages
        self.resources: list[dict[str, str]] = []
        self.url = ""

    async def _traces(self, request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest.FromString(await request.read())
        for resource_spans in export.resource_spans:
            attributes = resource_spans.resource.attributes
            self.resources.append({a.key: a.value.string_value for a in attributes})
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(scope_spans.spans)
        body = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=body, content_type="application/x-protobuf")

    async def run(self) -> AsyncIterator[OtlpReceiver]:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            yield self
        finally:
            await runner.cleanup()


@pytest.fixture
async def otlp() -> AsyncIterator[OtlpReceiver]:
    async for receiver in OtlpReceiver().run():
        yield receiver


async def test_docs_worker_exports_its_delivery_spans_over_otlp(
    pg_dsn: str, db, names: Names, tmp_path: Path, otlp: OtlpReceiver
) -> None:
    """docs/operating/tracing.md's "The worker" lines as written, but for the collector's address: a
    collector of the test's own gets the delivery span, a child of the enqueued context."""
    pip, *exports, run = doc_snippet("operating/tracing.md", "The worker", "sh").text.splitlines()
    assert pip == pip_install("otel") and run == "outbox-worker run"
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert any(r.startswith("opentelemetry-distro[otlp]") for r in extras["otel"])
    env = dict(
        pair.split("=", 1) for line in exports for pair in shlex.split(line.removeprefix("export "))
    )
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://127.0.0.1:")
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp.url

    seen = await run_probe(pg_dsn, db, names, tmp_path, env)
    # Spans are exported in batches: the last one at the latest when the worker exits.
    [span] = [s for s in otlp.spans if s.name == "outbox deliver probe"]
    _, trace_id, parent_id, _ = PARENT.split("-")
    assert (span.trace_id.hex(), span.parent_span_id.hex()) == (trace_id, parent_id)
    attributes = {a.key: a.value for a in span.attributes}
    assert attributes["outbox.outcome"].string_value == "sent"
    assert {"service.name": "outbox-worker"}.items() <= otlp.resources[0].items()
    # The handler was given the delivery span's context, the producer's tracestate kept.
    assert seen["trace_context"] == {
        "traceparent": f"00-{trace_id}-{span.span_id.hex()}-01",
        "tracestate": STATE,
    }
    assert "opentelemetry.sdk.trace" in seen["opentelemetry_modules"]
