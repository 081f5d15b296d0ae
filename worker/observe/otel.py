"""Delivery spans with OpenTelemetry (the ``otel`` extra). Imported only when tracing is on
(``worker.observe.tracing.from_env``) or when the producer's process has loaded OpenTelemetry
itself.

Each delivery is one span, ``outbox deliver <kind>``, whose parent is the trace context the
producer enqueued (a new trace when there is none). The sink is handed the intent with the
span's own context, so the message it sends carries the delivery span as the receiver's
parent. Only the W3C trace context is read and written, whatever propagators the process has
configured: it is what the intent table stores.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

from opentelemetry import context, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from worker.distribution import NAME
from worker.intent import Intent
from worker.outcome import Dead, Outcome, Released, Retry

__all__ = ["DeliveryTracer", "current_trace_context", "provider_from_env"]

_W3C = TraceContextTextMapPropagator()


def current_trace_context() -> dict[str, str] | None:
    """The active span's W3C trace context, for a producer to enqueue; None without one."""
    if not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    _W3C.inject(carrier)
    return carrier or None


def provider_from_env() -> TracerProvider:
    """The process's tracer provider: the one already set up (``opentelemetry-instrument``,
    or an application that embeds the relay), else the SDK configured from the ``OTEL_*``
    variables by opentelemetry-distro's configurator, the one ``opentelemetry-instrument``
    runs."""
    current = trace.get_tracer_provider()
    if not isinstance(current, trace.ProxyTracerProvider):
        return current
    from opentelemetry.distro import OpenTelemetryConfigurator

    OpenTelemetryConfigurator().configure()
    return trace.get_tracer_provider()


def _outcome_name(outcome: Outcome) -> str:
    return type(outcome).__name__.lower()  # sent, retry, dead, released


class DeliveryTracer:
    """Opens a span when a delivery starts and ends it with the delivery's outcome."""

    def __init__(self, provider: TracerProvider) -> None:
        self._tracer = provider.get_tracer(NAME)
        self._open: dict[int, Span] = {}  # intent id -> its delivery's span

    def _span(self, intent: Intent) -> Span:
        parent = _W3C.extract(intent.trace_context) if intent.trace_context else None
        return self._tracer.start_span(
            f"outbox deliver {intent.kind}",
            context=parent,
            kind=SpanKind.PRODUCER,
            attributes={
                "outbox.kind": intent.kind,
                "outbox.intent.id": intent.id,
                "outbox.attempt": intent.attempts,
            },
        )

    def start(self, intent: Intent) -> Intent:
        """Open the span; return the intent as the sink must see it (the span's context)."""
        span = self._open[intent.id] = self._span(intent)
        carrier: dict[str, str] = {}
        _W3C.inject(carrier, context=trace.set_span_in_context(span))
        return replace(intent, trace_context=carrier or None)

    @contextmanager
    def current(self, intent: Intent) -> Iterator[None]:
        """The delivery's span as the current one while its sink runs: spans the sink or a
        handler opens (an instrumented HTTP client, your own) become its children."""
        token = context.attach(trace.set_span_in_context(self._open[intent.id]))
        try:
            yield
        finally:
            context.detach(token)

    def finish(self, intent: Intent, outcome: Outcome) -> None:
        span = self._open.pop(intent.id, None)
        if span is None:  # never started: its kind has no sink (a span of no length)
            span = self._span(intent)
        span.set_attribute("outbox.outcome", _outcome_name(outcome))
        if isinstance(outcome, Retry):
            span.set_attribute("outbox.retry_delay", outcome.delay)  # seconds
        if isinstance(outcome, Retry | Dead):
            span.set_status(Status(StatusCode.ERROR, outcome.error))
        span.end()

    def abandon(self) -> None:
        """End the spans of deliveries cancelled without an outcome (a hard stop): their
        intents go back to pending."""
        for span in self._open.values():
            span.set_attribute("outbox.outcome", _outcome_name(Released()))
            span.end()
        self._open.clear()
