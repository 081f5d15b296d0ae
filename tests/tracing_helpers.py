"""OpenTelemetry for tests: a tracer provider of the test's own (the SDK's in-memory
exporter, no global state), and the checks that a message carried its delivery's span."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Span, SpanContext, Tracer

from worker.observe.otel import DeliveryTracer


def traceparent(context: SpanContext) -> str:
    """The W3C header for a span."""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


@dataclass
class Traces:
    provider: TracerProvider = field(default_factory=TracerProvider)
    exporter: InMemorySpanExporter = field(default_factory=InMemorySpanExporter)

    def __post_init__(self) -> None:
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer: Tracer = self.provider.get_tracer("tests")  # the producer's spans
        self.delivery_tracer = DeliveryTracer(self.provider)  # the relay's

    def deliveries(self) -> list[ReadableSpan]:
        """The finished delivery spans, in the order they ended."""
        spans = self.exporter.get_finished_spans()
        return [s for s in spans if s.name.startswith("outbox deliver ")]

    def delivery_of(self, intent_id: int) -> ReadableSpan:
        [span] = [s for s in self.deliveries() if s.attributes["outbox.intent.id"] == intent_id]
        return span

    def assert_carried(self, producer: Span, carried: Mapping[int, str]) -> None:
        """Each intent's message carried (``carried``: intent id -> its ``traceparent``) the
        span of its delivery, a child of ``producer``'s span in the same trace."""
        want = producer.get_span_context()
        assert carried
        for intent_id, header in carried.items():
            span = self.delivery_of(intent_id)
            assert span.parent is not None and span.parent.span_id == want.span_id
            assert span.context.trace_id == want.trace_id
            assert header == traceparent(span.context)
            assert span.attributes["outbox.outcome"] == "sent"
