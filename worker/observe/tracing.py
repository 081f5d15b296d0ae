"""Trace context without OpenTelemetry: the switch that turns delivery spans on, and the hook
every sink uses to put an intent's W3C trace context on the message it sends.

Nothing here imports ``opentelemetry``: a worker that does not trace never loads it. The
spans themselves live in ``worker.observe.otel``, imported only once the switch is on.

Tracing is on when all of these hold (the standard ``OTEL_*`` variables, nothing of ours):

* ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``, ``console``, ...), not ``none``;
* ``OTEL_SDK_DISABLED`` is not ``true``;
* the ``otel`` extra is installed (else one warning says how to install it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, TypeVar

from worker.distribution import pip_install
from worker.intent import Intent

if TYPE_CHECKING:
    from worker.observe.otel import DeliveryTracer

__all__ = ["TRACE_FIELDS", "from_env", "tracing_wanted", "with_trace_context"]

log = logging.getLogger("outbox.tracing")

TRACE_FIELDS = frozenset({"traceparent", "tracestate"})

V = TypeVar("V")


def tracing_wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """What the environment asks for; says nothing about whether the extra is installed."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = [e.strip().lower() for e in environ.get("OTEL_TRACES_EXPORTER", "").split(",")]
    return any(e and e != "none" for e in exporters)


def from_env(environ: Mapping[str, str] = os.environ) -> DeliveryTracer | None:
    """A tracer for the relay's deliveries, or None when tracing is off (see above)."""
    if not tracing_wanted(environ):
        return None
    try:
        from worker.observe.otel import DeliveryTracer, provider_from_env
    except ImportError as exc:
        if exc.name and exc.name.startswith("worker"):
            raise  # our own bug, not a missing extra
        log.warning(
            "OTEL_TRACES_EXPORTER is set but the 'otel' extra is not installed (%s is "
            "missing): deliveries are not traced; %s",
            exc.name or "a package",
            pip_install("otel"),
        )
        return None
    return DeliveryTracer(provider_from_env())


def with_trace_context(headers: Mapping[str, V], intent: Intent) -> Mapping[str, V | str]:
    """The sinks' hook: ``headers`` (a message's headers or fields) plus the intent's trace
    context (``traceparent``, and ``tracestate`` if any), which replaces any of the two the
    payload set itself, in any letter case. ``headers`` itself, unchanged, when the intent
    has none. Never mutates ``headers`` (it may be the payload's own dict).

    Where the receiving side's OpenTelemetry instrumentation looks for them: HTTP request
    headers, AMQP message headers, NATS headers; Celery's message headers (the task
    request's attributes); a Sidekiq job's top-level fields."""
    context = intent.trace_context
    if not context:
        return headers
    kept: dict[str, V | str] = {k: v for k, v in headers.items() if k.lower() not in TRACE_FIELDS}
    kept.update(context)
    return kept
