"""The broker's recent outcomes (cloud_broker/outcomes.py) and the metrics catalog."""

from __future__ import annotations

import pytest

from cloud_broker.outcomes import SAMPLE, Outcome, Outcomes
from skyhop.metrics import Metrics, counter, gauge, histogram


def _ok(ms: float, where: str = "edge", budget: float = 100) -> Outcome:
    return Outcome("m", "OK", ms, budget, where)


def test_attainment_counts_late_and_failed_replies_as_misses() -> None:
    o = Outcomes(bucket_s=5, keep_s=600)
    for t in range(10):
        o.record(1000 + t, _ok(10))
    o.record(1009, _ok(150))  # OK but over budget
    o.record(1009, Outcome("m", "INFEASIBLE", 1, 100, ""), "cannot be met")
    s = o.summary("m", 1009, 60)
    assert (s["requests"], s["met"], s["edge"], s["cloud"]) == (12, 10, 11, 0)
    assert s["attainment"] == pytest.approx(10 / 12, abs=1e-4)
    assert o.codes(1009, 60) == {"INFEASIBLE": 1}
    assert list(o.errors)[-1]["message"] == "cannot be met"


def test_windows_forget_what_is_older_than_their_span() -> None:
    o = Outcomes(bucket_s=5, keep_s=600)
    o.record(0, _ok(10, "cloud"))
    o.record(300, _ok(10))
    assert o.summary("m", 310, 60)["requests"] == 1
    assert o.summary("m", 310, 600)["requests"] == 2
    o.record(2000, _ok(10))
    assert o.summary("m", 2000, 600)["cloud"] == 0
    assert o.summary("other", 2000, 60)["attainment"] is None


def test_a_busy_bucket_keeps_a_bounded_spread_of_latencies() -> None:
    o = Outcomes(bucket_s=5, keep_s=10)
    for i in range(100_000):
        o.record(1.0, _ok(float(i % 1000)))
    (point,) = o.series("m", 1.0)
    assert point["requests"] == 100_000
    bucket = o._models["m"][-1]
    assert len(bucket.latencies) < SAMPLE
    assert point["p50_ms"] == pytest.approx(500, abs=60)
    assert point["p99_ms"] == pytest.approx(990, abs=30)
    assert len(o._models["m"]) <= 2  # keep_s / bucket_s


def test_metrics_render_declared_families_and_refuse_undeclared_ones() -> None:
    m = Metrics("t", {"hits_total": counter("Hits.", "code"), "wait_seconds":
                      histogram("Waits.", "model"), "depth": gauge("Depth.", "node"),
                      "plain_total": counter("Plain.")})
    m.inc("hits_total", code="OK")
    m.observe("wait_seconds", 0.003, model="a")
    m.read("depth", lambda: {("n1",): 3})
    text = m.render().decode()
    assert '# HELP t_hits_total Hits.' in text and 't_hits_total{code="OK"} 1.0' in text
    assert 't_wait_seconds_bucket{le="0.005",model="a"} 1.0' in text
    assert 't_depth{node="n1"} 3.0' in text and "t_plain_total 0.0" in text
    assert m.get("hits_total", code="OK") == 1 and m.get("hits_total", code="NO") == 0
    with pytest.raises(KeyError):
        m.inc("typo_total")
    with pytest.raises(ValueError):
        m.read("hits_total", lambda: 1)


def test_a_broken_gauge_reader_costs_its_family_not_the_scrape() -> None:
    m = Metrics("t", {"good": gauge("Good."), "bad": gauge("Bad.")})
    m.read("good", lambda: 1)
    m.read("bad", lambda: 1 / 0)
    text = m.render().decode()
    assert "t_good 1.0" in text and "t_bad " not in text
