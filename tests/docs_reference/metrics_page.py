"""docs/reference/metrics.md from the declarations the collector builds its families from
(worker/observe/metric_specs.py): every metric, its type, labels and help."""

from __future__ import annotations

from tests.docs_reference.markdown import code, page, prose, table
from worker.observe.histogram import BUCKETS
from worker.observe.metric_specs import METRICS, MetricSpec


def _seconds(value: float) -> str:
    return f"{value * 1000:g} ms" if value < 1 else f"{value:g} s"


def _row(spec: MetricSpec) -> tuple[str, str, str, str]:
    what = prose(spec.text)
    if spec.type == "histogram":
        what += f" Buckets from {_seconds(BUCKETS[0])} to {_seconds(BUCKETS[-1])}, then +Inf."
    # The text format has no info type: an info metric is a gauge whose value is 1.
    kind = "gauge (info)" if spec.type == "info" else spec.type
    return code(spec.name), kind, ", ".join(code(label) for label in spec.labels), what


def metrics_page() -> str:
    edges = ", ".join(f"{edge:g}" for edge in BUCKETS)
    return page(
        "Metrics",
        "worker/observe/metric_specs.py",
        "`outbox-worker run --http HOST:PORT` serves these at `/metrics`, in the Prometheus "
        "text format (OpenMetrics when the scraper asks for it). Names, types, labels and help "
        "are those the worker declares; the collector cannot expose a metric that is not in "
        "this table.",
        table(("metric", "type", "labels", "what"), (_row(spec) for spec in METRICS.values())),
        "## Labels\n\n"
        "On the intent counters and the histograms, `kind` is one of the kinds this worker "
        "has a sink or handler for; any other kind a producer writes is counted as "
        "`(unknown)`, so a typo cannot create series without bound. `state`, `status` and "
        "`operation` take only the values the table names. `outbox_xmin_horizon_holder` has "
        "one series at a time; its `kind` is what holds the horizon. No label carries a URL, "
        "an address, an error message or an intent id.",
        "## Histograms\n\n"
        f"Both histograms have the same bucket edges, in seconds: {edges}, and `+Inf`.",
        "## Also exposed\n\n"
        "prometheus-client's `process_*` metrics for the worker's process (CPU, memory, open "
        "files), which are not the worker's own and are not listed here.",
    )
