"""The live autoscaler's input, built from what the broker counted: no MQTT, no clock."""

from __future__ import annotations

import dataclasses

import pytest

from cloud_broker.autoscaler import AUTOSCALERS, PoolView, ScaleConfig, initial_state, scale
from cloud_broker.config import AutoscaleConfig, scale_config
from cloud_broker.demand import DemandCounter, wanted_cloud
from cloud_broker.fleet import Fleet
from cloud_broker.placement import Decision
from cloud_broker.scaling import cloud_network, reason, scale_context
from skyhop.errors import ErrorCode
from skyhop.protocol.messages import NodeStatus, SlaConfig
from tests.unit.test_placement import NOW, add

POOL_ONLY = {"backend", "models", "slots", "providers", "gpus", "worker_prefix",
             "stop_grace_s", "ray_address", "num_gpus", "num_cpus", "namespace", "deployment",
             "kube_context"}


def test_counter_counts_since_the_last_take_and_keeps_budget_and_size() -> None:
    counter = DemandCounter()
    counter.request("a", budget_ms=200, cloud_wanted=True)
    counter.request("a", budget_ms=300, cloud_wanted=False)
    counter.reply("a", 1000)
    counter.reply("a", 2000)
    first = counter.take(known={"b"})
    assert (first["a"].requests, first["a"].cloud_wanted, first["a"].budget_ms) == (2, 1, 300)
    assert first["a"].message_bytes == 1200  # smoothed: one odd payload does not reprice
    assert first["b"].requests == 0  # known, never asked for: its zeros are a trend too
    second = counter.take()
    assert (second["a"].requests, second["a"].cloud_wanted) == (0, 0)
    assert second["a"].budget_ms == 300 and second["a"].message_bytes == 1200
    assert list(second) == ["a", "b"]  # sorted: the same counts give the same context


def test_an_unplaced_request_wants_an_empty_pool_that_serves_its_model() -> None:
    nowhere = Decision(None, code=ErrorCode.UNAVAILABLE)
    assert wanted_cloud(nowhere, "m", ("m",), pool_ready=0)  # a pool at zero must wake
    assert not wanted_cloud(nowhere, "m", ("m",), pool_ready=1)  # placement judged it
    assert not wanted_cloud(nowhere, "other", ("m",), pool_ready=0)
    assert not wanted_cloud(Decision("edge-1"), "m", ("m",), pool_ready=0)
    assert wanted_cloud(Decision("edge-1", cloud_wanted=True), "m", (), pool_ready=3)


def test_context_reads_the_cloud_from_the_fleet_and_the_budget_from_the_sla() -> None:
    fleet = Fleet()
    add(fleet, "edge-1", mean=50, p95=60, rtt=30)
    add(fleet, "gpu-1", role="cloud", gpu="nvidia-l4", mean=8, p95=12, rtt=4)
    counter = DemandCounter()
    for wanted in (True, True, False):
        counter.request("m", budget_ms=500, cloud_wanted=wanted)
    counter.reply("m", 10_000)
    view = PoolView(ready=1, starting=1, slots=2)
    sla = {"m": SlaConfig(model="m", budget_ms=120)}
    ctx = scale_context(NOW, counter.take(), fleet, sla, view, ScaleConfig())
    (m,) = ctx.models
    assert (m.model, m.cloud_requests, m.requests) == ("m", 2, 3)
    assert (m.service_ms, m.p95_ms) == (8, 12)  # the cloud class, not the edge's
    assert m.budget_ms == 120  # the SLA wins over the requests' own budgets
    link = fleet.nodes["gpu-1"].link  # as its load report priced it: 4 ms round trip
    assert m.network_ms == pytest.approx(4 + 10_000 * link.ms_per_byte)
    assert ctx.pool is view and ctx.now_ms == NOW


def test_a_model_never_served_on_the_cloud_has_no_service_time() -> None:
    fleet = Fleet()
    add(fleet, "edge-1")
    counter = DemandCounter()
    counter.request("m", budget_ms=80, cloud_wanted=True)
    (m,) = scale_context(NOW, counter.take(), fleet, {}, PoolView(0, 0), ScaleConfig()).models
    assert (m.service_ms, m.p95_ms, m.network_ms, m.budget_ms) == (0, 0, 0, 80)


def test_a_burst_of_cloud_demand_grows_the_pool() -> None:
    fleet = Fleet()
    add(fleet, "pool-1", role="cloud", mean=50, p95=70, rtt=1)
    counter = DemandCounter()
    for _ in range(100):  # 20/s over a 5 s interval: one 50 ms worker cannot keep up
        counter.request("m", budget_ms=400, cloud_wanted=True)
    config = ScaleConfig()
    ctx = scale_context(NOW, counter.take(), fleet, {}, PoolView(1, 0), config)
    target, state = scale(ctx, initial_state(config, 1))
    assert target >= 2
    why = reason(ctx, 1, target, state)
    assert why.startswith("up,cloud_wanted=20.0/s,requests=20.0/s")
    assert why.endswith(",hold=30s")  # no regret yet: the shortest hold


@pytest.mark.parametrize("share", [1.0, 0.0])
def test_the_early_warning_buys_ahead_of_a_rise_the_cloud_has_not_seen(share: float) -> None:
    """Requests climb ×1.8 an interval while the edges take them all (no cloud demand).
    With the early warning the pool grows before anything spills, and the log line says
    by how much; with ``early_warning = 0`` it waits for the spill."""
    fleet = Fleet()
    add(fleet, "pool-1", role="cloud", mean=50, p95=70, rtt=1)
    config = ScaleConfig(early_warning=share)
    state, counter, target = initial_state(config, 1), DemandCounter(), 1
    for i, n in enumerate((100, 180, 324, 583)):
        for _ in range(n):
            counter.request("m", budget_ms=400, cloud_wanted=False)
        ctx = scale_context(NOW + i * config.interval_ms, counter.take(), fleet, {},
                            PoolView(1, 0), config)
        old = target
        target, state = scale(ctx, state)
    counted = float(reason(ctx, old, target, state).split("early_warning=")[1].split("/s")[0])
    if share:
        assert target > 1 and counted > 0
    else:
        assert target == 1 and counted == 0


def test_a_worker_not_yet_priced_does_not_make_the_cloud_link_free() -> None:
    """A new pool worker is indexed at its birth with a 0 ms link; until its first load
    report or reply prices it, the autoscaler keeps the known workers' link cost."""
    fleet = Fleet()
    assert cloud_network(fleet, "m", 1000) == 0.0  # nothing known yet
    add(fleet, "pool-1", role="cloud", rtt=8)
    fleet.on_status(NodeStatus(node="pool-2", online=True, session=1, role="cloud",
                               models=("m",), concurrency=1, gpu="cpu"), NOW)
    assert cloud_network(fleet, "m", 0) == 8.0
    assert cloud_network(fleet, "m", 1000) > 8.0  # and the transfer on top


def test_autoscale_config_feeds_scale_config() -> None:
    cfg = AutoscaleConfig(policy="reactive", min_size=2, max_size=5, interval_ms=500,
                          early_warning=0.0)
    scaling = scale_config(cfg, margin=0.8)
    assert (scaling.policy, scaling.min_size, scaling.max_size) == ("reactive", 2, 5)
    assert (scaling.interval_ms, scaling.margin, scaling.early_warning) == (500, 0.8, 0.0)


def test_autoscale_config_matches_the_autoscaler() -> None:
    # scale_config() passes on the fields ScaleConfig has: any other must be the pool's.
    shared = {f.name for f in dataclasses.fields(ScaleConfig)}
    for name in AutoscaleConfig.model_fields:
        assert name in shared or name in POOL_ONLY, f"{name} is neither ScaleConfig's nor pool's"
    assert [AutoscaleConfig(policy=p, static_size=1).policy for p in AUTOSCALERS] == \
        list(AUTOSCALERS)
    with pytest.raises(ValueError, match="unknown autoscaler 'psychic'"):
        AutoscaleConfig(policy="psychic")
