"""docs/operating/monitoring.md, run as written: the alert rules pass `promtool check
rules` and fire (and stay quiet) in `promtool test rules`; the Kubernetes snippet's worker
answers its probes on the port the snippet names. (tests/test_docs_reference.py checks the
metrics reference against a real scrape.)"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import asyncpg
import yaml

from tests.docs_text import doc_snippet
from tests.fault.workers import WorkerProcess
from tests.monitoring import http_get, require_binary, wait_for_status
from tests.tcp_proxy import free_port
from worker.observe.http_server import READY_TIMEOUT
from worker.settings import Settings

PAGE = "operating/monitoring.md"


def _rules() -> dict[str, Any]:
    return yaml.safe_load(doc_snippet(PAGE, "Alerts", "yaml", "# outbox-alerts.yml").text)


def _promtool(*args: str, cwd: Path) -> str:
    result = subprocess.run(
        [require_binary("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_docs_alert_rules_pass_promtool_check(tmp_path: Path) -> None:
    (tmp_path / "alerts.yml").write_text(
        doc_snippet(PAGE, "Alerts", "yaml", "# outbox-alerts").text
    )
    assert "SUCCESS: 4 rules found" in _promtool("check", "rules", "alerts.yml", cwd=tmp_path)


def _alert(name: str, labels: dict[str, str]) -> dict[str, Any]:
    """What promtool must see firing: the rule's own labels and annotations on top."""
    rule = next(r for r in _rules()["groups"][0]["rules"] if r["alert"] == name)
    return {"exp_labels": {**labels, **rule["labels"]}, "exp_annotations": rule["annotations"]}


def test_docs_alert_rules_fire_on_their_fault_and_only_then(tmp_path: Path) -> None:
    (tmp_path / "alerts.yml").write_text(
        doc_snippet(PAGE, "Alerts", "yaml", "# outbox-alerts").text
    )
    w1 = 'instance="w1",job="outbox-worker"'
    w2 = 'instance="w2",job="outbox-worker"'
    series = [
        # w1 and w2 read the same table: the oldest due intent ages past a minute.
        (f"outbox_queue_oldest_due_age_seconds{{{w1}}}", "0 0 0 0 30 90+60x20"),
        (f"outbox_queue_oldest_due_age_seconds{{{w2}}}", "0 0 0 0 30 90+60x20"),
        # email: 5 dead per 100 sent a minute (5%); webhook: 1 per 1,000 (0.1%, below 1%).
        (f'outbox_intents_sent_total{{kind="email",{w1}}}', "0+100x25"),
        (f'outbox_intents_dead_total{{kind="email",{w1}}}', "0+5x25"),
        (f'outbox_intents_sent_total{{kind="webhook",{w1}}}', "0+1000x25"),
        (f'outbox_intents_dead_total{{kind="webhook",{w1}}}', "0+1x25"),
        # w1's LISTEN connection drops at minute 3 and stays down; w2's blips for 2 minutes.
        (f"outbox_listener_connected{{{w1}}}", "1 1 1 0x22"),
        (f"outbox_listener_connected{{{w2}}}", "1 1 1 0 0 1x20"),
        # A session idle in transaction from minute 2 on; a slot keeps the horizon a little
        # behind all along (well under the bound).
        (f"outbox_oldest_transaction_age_seconds{{{w1}}}", "_ _ 0+60x50"),
        (f"outbox_xmin_horizon_age_xids{{{w2}}}", "1000+1000x50"),
    ]
    tests = {
        "rule_files": ["alerts.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series],
                "alert_rule_test": [
                    {"eval_time": "4m", "alertname": "OutboxFallingBehind", "exp_alerts": []},
                    {
                        "eval_time": "12m",
                        "alertname": "OutboxFallingBehind",
                        "exp_alerts": [_alert("OutboxFallingBehind", {})],
                    },
                    {"eval_time": "3m", "alertname": "OutboxDeadRate", "exp_alerts": []},
                    {
                        "eval_time": "20m",
                        "alertname": "OutboxDeadRate",
                        "exp_alerts": [_alert("OutboxDeadRate", {"kind": "email"})],
                    },
                    {"eval_time": "30m", "alertname": "OutboxVacuumHeldBack", "exp_alerts": []},
                    {
                        "eval_time": "38m",
                        "alertname": "OutboxVacuumHeldBack",
                        "exp_alerts": [_alert("OutboxVacuumHeldBack", {})],
                    },
                    {"eval_time": "8m", "alertname": "OutboxListenerDown", "exp_alerts": []},
                    {
                        "eval_time": "20m",
                        "alertname": "OutboxListenerDown",
                        "exp_alerts": [
                            _alert("OutboxListenerDown", {"instance": "w1", "job": "outbox-worker"})
                        ],
                    },
                ],
            }
        ],
    }
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(tests))
    assert "SUCCESS" in _promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)


async def test_docs_kubernetes_probes(pg_dsn: str, db: asyncpg.Connection, schema: str) -> None:
    spec = yaml.safe_load(doc_snippet(PAGE, "Kubernetes", "yaml", "# pod spec").text)["spec"]
    assert spec["terminationGracePeriodSeconds"] > Settings().grace
    container = spec["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    args = list(container["args"])
    listen = args[args.index("--http") + 1]
    # The probes reach the port --http listens on.
    assert listen.endswith(f":{ports[container['readinessProbe']['httpGet']['port']]}")
    assert listen.endswith(f":{ports[container['livenessProbe']['httpGet']['port']]}")
    assert container["readinessProbe"]["timeoutSeconds"] > READY_TIMEOUT

    # The container, run here: its args as written (on a free port), DATABASE_URL from the
    # "secret", the test's schema.
    port = free_port()
    args[args.index("--http") + 1] = listen.rpartition(":")[0] + f":{port}"
    [env_var] = container["env"]
    worker = WorkerProcess(args, env={env_var["name"]: pg_dsn, "OUTBOX_SCHEMA": schema})
    await worker.start()
    try:
        base = f"http://127.0.0.1:{port}"
        for probe in ("readinessProbe", "livenessProbe"):
            await wait_for_status(base + container[probe]["httpGet"]["path"], 200)
        status, text = await http_get(f"{base}/metrics")
        assert status == 200 and "outbox_build_info{" in text  # the metrics port is this one
    finally:
        await worker.aclose()
