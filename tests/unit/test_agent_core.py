"""The agent's pure core, the broker's tracker, the replay guard and the estimators."""

from __future__ import annotations

import pytest

from cloud_broker.tracker import Pending, Request, Tracker
from edge_agent.workqueue import ResultCache, WorkQueue
from skyhop.errors import ErrorCode, ProtocolError
from skyhop.protocol.replay import ReplayGuard
from skyhop.stats import ServiceTime, percentile


def test_queue_is_earliest_deadline_first_and_bounded() -> None:
    q = WorkQueue(3)
    q.push("late", 30.0, 0.0, None)
    q.push("soon", 10.0, 0.0, None)
    q.push("mid", 20.0, 0.0, None)
    with pytest.raises(ProtocolError) as info:
        q.push("x", 5.0, 0.0, None)
    assert info.value.code == ErrorCode.OVERLOADED
    assert [q.pop(0.0)[0].request_id for _ in range(3)] == ["soon", "mid", "late"]


def test_queue_hands_back_expired_jobs_without_running_them() -> None:
    q = WorkQueue(10)
    q.push("a", 1.0, 0.0, None)
    q.push("b", 2.0, 0.0, None)
    q.push("c", 9.0, 0.0, None)
    job, expired = q.pop(now=5.0)
    assert job is not None and job.request_id == "c"
    assert [j.request_id for j in expired] == ["a", "b"]


def test_priority_breaks_deadline_ties() -> None:
    q = WorkQueue(10)
    q.push("low", 1.0, 0.0, None, priority=0)
    q.push("high", 1.0, 0.0, None, priority=5)
    assert q.pop(0.0)[0].request_id == "high"


def test_result_cache_answers_duplicates_and_is_bounded() -> None:
    cache = ResultCache(2)
    assert cache.lookup("a") == (False, None)
    cache.begin("a")
    assert cache.lookup("a") == (True, None)  # running: the duplicate waits for the original
    cache.finish("a", b"reply-a")
    assert cache.lookup("a") == (True, b"reply-a")
    cache.finish("b", b"b")
    cache.finish("c", b"c")
    assert cache.lookup("a") == (False, None)


def test_replay_guard() -> None:
    guard = ReplayGuard(window_ms=1000)
    guard.check("a", sent_at_ms=0, now_ms=10)
    with pytest.raises(ProtocolError) as info:
        guard.check("a", sent_at_ms=0, now_ms=20)
    assert info.value.code == ErrorCode.REPLAYED
    with pytest.raises(ProtocolError, match="replay window"):
        guard.check("b", sent_at_ms=0, now_ms=5000)
    guard.check("a", sent_at_ms=9000, now_ms=9000)  # long forgotten and fresh again: fine


def _pending(rid: str, deadline: float) -> Pending:
    return Pending(Request(rid * 32, "m", 0, deadline), 0.0, deadline)


def test_tracker_completes_each_request_once() -> None:
    t = Tracker()
    t.accept(_pending("a", 100))
    t.accept(_pending("b", 50))
    t.assign("a" * 32, "n1", 1.0)
    assert [p.request.id[0] for p in t.on_node("n1")] == ["a"]
    assert t.complete("a" * 32) is not None
    assert t.complete("a" * 32) is None
    assert [p.request.id[0] for p in t.overdue(60)] == ["b"]
    assert t.overdue(1000) == [] and len(t) == 0


def test_service_time_estimator() -> None:
    s = ServiceTime(prior_ms=7.0)
    assert s.mean_ms == 7.0 and s.p95_ms == 7.0
    for i in range(100):
        s.observe(100.0 if i % 20 == 19 else 10.0)
    assert 10 <= s.mean_ms < 60 and s.p95_ms == 100.0
    assert percentile([1, 2, 3, 4], 50) == 2 and percentile([], 99) == 0.0


def test_config_accepts_exactly_the_placement_policies() -> None:
    from cloud_broker.config import BrokerConfig
    from cloud_broker.placement import POLICIES

    assert [BrokerConfig(policy=p).policy for p in POLICIES] == list(POLICIES)
    with pytest.raises(ValueError, match="unknown policy 'fastest'; choose one of deadline"):
        BrokerConfig(policy="fastest")


def test_status_table_shows_each_nodes_memory() -> None:
    from rich.console import Console

    from skyhop.cli.status_view import status_table

    node = {"node": "gpu-1", "role": "cloud", "live": True, "gpu": "nvidia-h200", "queue": 0,
            "in_flight": 1, "gpu_util": 0.42, "rtt_ms": 3.0, "service_ms": {}, "placements": 7}
    status = {"nodes": [node | {"mem_mb": [2048.0, 143771.0]},
                        node | {"node": "new-1", "mem_mb": [0.0, 0.0]}, node | {"node": "old-1"}]}
    console = Console(record=True, width=200)
    console.print(status_table(status))
    lines = {line.split()[0]: line for line in console.export_text().splitlines()
             if line.strip()}
    assert "2.0/140G" in lines["gpu-1"]
    assert " - " in lines["new-1"] and " - " in lines["old-1"]  # no report yet; older broker


def test_status_table_shows_the_pool_backend_and_each_worker_state() -> None:
    from rich.console import Console

    from skyhop.cli.status_view import status_table

    pool = {"backend": "ray", "ready": 1, "starting": 1, "target": 2, "min_size": 1,
            "max_size": 3, "policy": "predictive",
            "workers": [{"node": "pool-1", "ready": True, "state": "ready"},
                        {"node": "pool-2", "ready": False, "state": "starting"},
                        {"node": "pool-3", "ready": False, "state": "draining"}]}
    console = Console(record=True, width=200)
    console.print(status_table({"nodes": [], "pool": pool}))
    text = " ".join(console.export_text().split())  # a caption wraps at the table's width
    assert "pool (ray) 1 ready + 1 starting, target 2" in text
    assert "workers pool-1 ready, pool-2 starting, pool-3 draining" in text


def test_a_status_no_broker_has_refreshed_says_it_is_stale() -> None:
    import time

    from skyhop.cli.status_view import STALE_S, caption, staleness

    now = time.time()
    assert staleness({"time": now - 1}, now) is None
    assert staleness({}, now) is None  # an older broker without a time: nothing to judge
    old = {"time": now - STALE_S - 50, "nodes": []}
    assert "STALE: this status is 60 s old" in (staleness(old, now) or "")
    assert caption(old).startswith("STALE")


def test_rate_limiter_allows_a_burst_then_the_rate_per_client() -> None:
    from cloud_broker.ratelimit import RateLimiter

    limiter = RateLimiter(rate_per_s=10, burst=3, max_clients=2)
    assert [limiter.allow("a", 0) for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b", 0)  # another client has its own bucket
    assert not limiter.allow("a", 50) and limiter.allow("a", 100)  # 1 token per 100 ms
    assert not limiter.allow("a", 100)
    assert [limiter.allow("a", 10_000) for _ in range(4)] == [True, True, True, False]
    limiter.allow("c", 10_000)  # a third client: the least recent ("b") is forgotten
    assert list(limiter._buckets) == ["a", "c"]


def _wide_fleet() -> dict:
    node = {"node": "edge-camera-0042", "role": "edge", "live": True, "state": "draining",
            "gpu": "jetson-orin-nx", "queue": 120, "in_flight": 4, "gpu_util": 1.0,
            "rtt_ms": 95.25, "mem_mb": [7000.0, 16000.0], "placements": 123456,
            "service_ms": {"digits": 0.4, "ppocr-cls": 812.5, "ppocr-det": 1999.9,
                           "yolo": 77.0, "other": 3.0}}
    return {"policy": "deadline", "pending": 3, "time": 1.8e9,
            "latency_ms": {"p50": 1.2, "p99": 9.9},
            "placements": {"edge": 1000, "cloud": 20},
            "nodes": [node, node | {"node": "gpu-1", "live": False, "state": "offline"}]}


def test_status_table_fits_80_columns_one_line_per_node() -> None:
    from rich.console import Console

    from skyhop.cli.status_view import status_table

    console = Console(record=True, width=80)
    console.print(status_table(_wide_fleet()))
    text = console.export_text()
    lines = text.splitlines()
    assert max(map(len, lines)) <= 80
    header = next(line for line in lines if "node" in line and "placed" in line)
    for name in ("role", "state", "device", "q/run", "util", "memory", "rtt", "svc"):
        assert name in header  # no header cut
    rows = [line for line in lines if line.lstrip().startswith(("edge-camera", "gpu-1"))]
    assert len(rows) == 2 and "1999.9" in rows[0]  # one line each; the slowest model
    assert "placed cloud 20 edge 1000" in text  # not a Python dict


def test_status_lines_are_plain_and_greppable() -> None:
    from skyhop.cli.status_view import status_lines

    lines = status_lines(_wide_fleet())
    node = [line for line in lines if " node gpu-1 " in line]
    assert len(node) == 1 and "state=offline" in node[0] and "svc_ms=1999.9" in node[0]
    assert all("\x1b" not in line and "{" not in line for line in lines)


def test_the_demo_verdict_explains_refusals_and_slow_models() -> None:
    from skyhop.dev.demo import Outcome, summarize, verdict

    outcomes = ([Outcome("digits", 50, latency_ms=2.0, where="edge")] * 70
                + [Outcome("digits", 50, code="INFEASIBLE")] * 24
                + [Outcome("ppocr-cls", 100, latency_ms=300.0, where="edge")] * 6)
    lines = verdict(summarize(outcomes))
    assert lines[0] == "verdict: 70% of 100 requests met their budget."
    assert lines[1].startswith("  INFEASIBLE 24 (24%): the budget was below the best time")
    slow = next(line for line in lines if line.startswith("  ppocr-cls"))
    assert "met its budget 0%" in slow and "median latency (300 ms)" in slow
    healthy = verdict(summarize([Outcome("digits", 50, latency_ms=2.0)] * 20))
    assert healthy == ["verdict: 100% of 20 requests met their budget — healthy."]


def test_a_job_in_progress_answers_every_broker_that_asked_for_it() -> None:
    cache = ResultCache(4)
    cache.begin("a", ("broker/b1/replies", b"a"))
    assert cache.also("a", ("broker/b1/replies", b"a")) is None  # a redelivery: no route
    assert cache.also("a", ("broker/b2/replies", b"a")) is None  # b1 died; b2 asks
    assert cache.finish("a", b"reply-a") == [("broker/b2/replies", b"a")]
    assert cache.also("a", ("broker/b3/replies", b"a")) == b"reply-a"  # finished: cached
