"""deploy/grafana/skyhop.json charts only what the broker and agents export."""

from __future__ import annotations

import json
import re
from pathlib import Path

from cloud_broker.broker_metrics import CATALOG, NAMESPACE
from edge_agent.agent import METRICS
from skyhop.metrics import exported_names

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "skyhop.json"
# A PromQL word that names a series: skyhop_... (functions and labels never start so).
SERIES = re.compile(r"\bskyhop_[a-z0-9_]+")


def _expressions() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in doc["panels"] for t in p["targets"]]


def test_every_expression_names_an_exported_metric() -> None:
    exported = exported_names(NAMESPACE, CATALOG) | exported_names("skyhop_agent", METRICS)
    exprs = _expressions()
    assert len(exprs) >= 10
    for expr in exprs:
        names = SERIES.findall(expr)
        assert names, f"{expr!r} names no skyhop metric"
        assert set(names) <= exported, f"{expr!r}: not exported: {set(names) - exported}"


def test_the_dashboard_covers_what_operators_asked_for() -> None:
    text = " ".join(_expressions())
    for needed in ("slo_met_total", "request_latency_seconds_bucket", "replies_total",
                   "node_device_utilization_ratio", "node_queue_depth", "pool_target",
                   "refused_total"):
        assert needed in text, needed
