"""The generated reference pages (docs/reference/) are what the code generates now, and
/metrics shows only the metrics the page documents (worker/observe/metric_specs.py)."""

from __future__ import annotations

import asyncpg
import pytest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Recorder, RelayFactory, wait_until
from tests.docs_reference.markdown import COMMAND, cell
from tests.docs_reference.pages import DOCS, generate
from tests.monitoring import http_get
from tests.tcp_proxy import free_port
from worker.errors import PermanentError
from worker.intent import Intent
from worker.observe.health import HealthMonitor
from worker.observe.http_server import http_endpoint
from worker.observe.metric_specs import METRICS, MetricSpec
from worker.observe.metrics import declared
from worker.store.db import create_pool


async def test_the_committed_pages_are_what_the_code_generates(pg_dsn: str) -> None:
    pages = await generate(pg_dsn)
    stale = [
        name
        for name, text in pages.items()
        if not (DOCS / name).exists() or (DOCS / name).read_text() != text
    ]
    assert not stale, (
        f"docs/{', docs/'.join(stale)} differ from what the code generates: run "
        f"`.venv/bin/{COMMAND}` and commit the result"
    )


def test_a_cell_escapes_markup_outside_code_only() -> None:
    # Python-Markdown's tables split on a bare | outside code, and show a \ inside code;
    # host[:port] would be a reference link, *.example.com emphasis.
    assert cell("a | b `c | d`\n e") == "a \\| b `c | d` e"
    assert cell("host[:port] *.x `[y]`") == "host\\[:port\\] \\*.x `[y]`"


def test_a_metric_must_be_declared_with_its_type() -> None:
    with pytest.raises(KeyError):
        declared(GaugeMetricFamily, "outbox_not_declared")
    with pytest.raises(TypeError, match="declared a counter"):
        declared(GaugeMetricFamily, "outbox_claims_total")
    assert declared(CounterMetricFamily, "outbox_claims_total").documentation == (
        METRICS["outbox_claims_total"].text
    )


def _exposed(spec: MetricSpec) -> tuple[str, str]:
    """(family name, type) as the Prometheus text format parser reports them."""
    if spec.type == "counter":
        return spec.name.removesuffix("_total"), "counter"
    return spec.name, "gauge" if spec.type == "info" else spec.type


async def test_a_real_scrape_shows_only_declared_metrics(
    start_relay: RelayFactory, db: asyncpg.Connection, schema: str, pg_dsn: str
) -> None:
    async def reject(_intent: Intent) -> None:
        raise PermanentError("no")

    address = f"127.0.0.1:{free_port()}"
    pool = await create_pool(pg_dsn, max_size=2, application_name="outbox-worker test")
    try:
        async with start_relay({"ok": Recorder(), "bad": reject}) as relay:
            health = HealthMonitor(pool, relay.store, relay.stats)
            async with http_endpoint(address, relay, pool, health, ["ok", "bad"]):
                for kind in ("ok", "bad", "typo"):
                    await db.execute(f'SELECT "{schema}".enqueue($1, $2::jsonb)', kind, "{}")
                await wait_until(lambda: sum(relay.stats.dead.values()) == 2)
                status, text = await http_get(f"http://{address}/metrics")
    finally:
        await pool.close()
    assert status == 200, text
    declared_families = {_exposed(spec): spec for spec in METRICS.values()}
    seen = set()
    for family in text_string_to_metric_families(text):
        if family.name.startswith("process_"):  # prometheus-client's, about the process
            continue
        spec = declared_families.get((family.name, family.type))
        assert spec is not None, f"{family.name} ({family.type}) is not declared"
        for sample in family.samples:
            labels = set(sample.labels) - {"le"}  # a histogram bucket's edge
            assert labels == set(spec.labels), (sample.name, sample.labels)
        seen.add(spec.name)
    always = {spec.name for spec in METRICS.values() if not spec.absent}
    assert always <= seen, f"declared, never absent, yet not shown: {sorted(always - seen)}"
