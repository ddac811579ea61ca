"""Fleet view and placement on hand-built snapshots: no MQTT, no clock."""

from __future__ import annotations

import random

import pytest

from cloud_broker.fleet import Fleet
from cloud_broker.placement import Ask, place, predict_ms
from skyhop.errors import ErrorCode
from skyhop.messages import LoadReport, ModelLoad, NodeStatus

NOW = 10_000.0


def add(fleet: Fleet, node: str, *, role: str = "edge", mean: float = 5.0, p95: float = 6.0,
        queue: int = 0, in_flight: int = 0, capacity: int = 8, rtt: float = 2.0,
        concurrency: int = 1, models: tuple[str, ...] = ("m",), session: int = 1,
        at: float = NOW) -> None:
    fleet.on_status(NodeStatus(node=node, online=True, session=session, role=role,
                               models=models, concurrency=concurrency), at)
    fleet.on_load(LoadReport(node=node, session=session, seq=1, queue=queue,
                             in_flight=in_flight, capacity=capacity, rtt_ms=rtt,
                             models={m: ModelLoad(mean, p95, 10) for m in models}), at)


def decide(fleet: Fleet, budget: float = 100.0, size: int = 1000, policy: str = "deadline",
           model: str = "m", now: float = NOW):  # type: ignore[no-untyped-def]
    return place(fleet, Ask(model, size, budget), now, random.Random(0), policy=policy)


def test_prefers_an_edge_that_meets_the_budget_over_a_faster_cloud() -> None:
    fleet = Fleet()
    add(fleet, "cloud", role="cloud", mean=1, p95=1, rtt=1)
    add(fleet, "edge", mean=10, p95=12, rtt=20)
    assert decide(fleet, budget=100).node == "edge"


def test_offloads_to_cloud_when_the_edge_cannot_make_it() -> None:
    fleet = Fleet()
    add(fleet, "cloud", role="cloud", mean=1, p95=1, rtt=1)
    add(fleet, "edge", mean=10, p95=12, rtt=20, queue=5)
    d = decide(fleet, budget=40)
    assert d.node == "cloud" and d.predicted_ms < 36


def test_infeasible_at_once_when_nothing_can_make_it() -> None:
    fleet = Fleet()
    add(fleet, "edge", mean=50, p95=60)
    d = decide(fleet, budget=30)
    assert (d.node is None and d.code == ErrorCode.INFEASIBLE and "60" in d.reason) or d.reason


def test_counts_work_placed_since_the_last_report() -> None:
    fleet = Fleet()
    add(fleet, "a", mean=10, p95=10, rtt=0)
    add(fleet, "b", mean=10, p95=10, rtt=0)
    first = decide(fleet, budget=1000).node
    fleet.dispatched(first)  # type: ignore[arg-type]
    second = decide(fleet, budget=1000).node
    assert {first, second} == {"a", "b"}  # the second goes where nothing was placed


def test_credit_limits_and_overloaded() -> None:
    fleet = Fleet()
    add(fleet, "a", capacity=2)
    fleet.dispatched("a")
    fleet.dispatched("a")
    assert decide(fleet, budget=1000).code == ErrorCode.OVERLOADED
    fleet.answered("a")
    assert decide(fleet, budget=1000).node == "a"


def test_unknown_and_unavailable_models() -> None:
    fleet = Fleet(node_timeout_ms=1000)
    assert decide(fleet).code == ErrorCode.UNKNOWN_MODEL
    add(fleet, "a")
    assert decide(fleet, now=NOW + 5000).code == ErrorCode.UNAVAILABLE  # telemetry went silent


def test_dead_node_and_stale_will() -> None:
    fleet = Fleet()
    add(fleet, "a", session=5)
    # A will from an older run must not kill the current session.
    assert not fleet.on_status(NodeStatus(node="a", online=False, session=4), NOW)
    assert decide(fleet).node == "a"
    assert fleet.on_status(NodeStatus(node="a", online=False, session=5), NOW)
    assert decide(fleet).code == ErrorCode.UNAVAILABLE


def test_expire_marks_silent_nodes_dead() -> None:
    fleet = Fleet(node_timeout_ms=1000)
    add(fleet, "a")
    assert fleet.expire(NOW + 500) == []
    assert fleet.expire(NOW + 1500) == ["a"]
    assert fleet.expire(NOW + 1600) == []


def test_exclude_tried_nodes() -> None:
    fleet = Fleet()
    add(fleet, "a")
    add(fleet, "b")
    d = place(fleet, Ask("m", 10, 100, exclude=frozenset({"a"})), NOW, random.Random(0))
    assert d.node == "b"


def test_prediction_includes_queue_service_rtt_and_transfer() -> None:
    fleet = Fleet()
    add(fleet, "a", mean=10, p95=15, rtt=4, queue=3, concurrency=1)
    view = fleet.nodes["a"]
    # 3 ahead on 1 slot: 3 × 10 ms wait, then p95 15 ms, then 4 ms + transfer
    expected = 30 + 15 + 4 + 100_000 * view.link.ms_per_byte
    assert predict_ms(view, Ask("m", 100_000, 1000)) == pytest.approx(expected)


def test_link_learns_round_trip_and_bandwidth() -> None:
    fleet = Fleet()
    add(fleet, "a", rtt=0)
    for _ in range(30):
        fleet.dispatched("a")
        fleet.answered("a", network_ms=10.0, size=500)
    link = fleet.nodes["a"].link
    assert link.rtt_ms == pytest.approx(10.0, rel=0.01)
    for _ in range(30):
        fleet.dispatched("a")
        fleet.answered("a", network_ms=10.0 + 80.0, size=1_000_000)  # 80 ms per MB
    assert link.ms_per_byte == pytest.approx(80 / 1_000_000, rel=0.05)


@pytest.mark.parametrize("policy", ["round-robin", "least-connection", "weighted"])
def test_baselines_spread_load(policy: str) -> None:
    fleet = Fleet()
    for n in ("a", "b", "c"):
        add(fleet, n)
    chosen = set()
    for _ in range(30):
        node = decide(fleet, policy=policy).node
        assert node is not None
        fleet.dispatched(node)
        chosen.add(node)
        if len(chosen) == 3:
            break
    assert chosen == {"a", "b", "c"}


def test_unknown_policy() -> None:
    fleet = Fleet()
    add(fleet, "a")
    with pytest.raises(ValueError, match="unknown policy"):
        decide(fleet, policy="fastest")
