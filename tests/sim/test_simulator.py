"""The simulator: deterministic, faithful to the scenario, and running the broker's own
placement. Small scenarios only: each run here takes well under a second."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cloud_broker.broker as broker
import cloud_broker.dispatch as dispatch
import cloud_broker.placement as placement
import sim.engine as engine
from cloud_broker.autoscaler import ModelDemand, ScaleConfig, workers_needed
from sim import BUILTIN, Scenario, dumps, load_scenario, simulate
from sim.arrivals import make_process
from sim.planner import (
    clairvoyant_targets,
    needs_per_second,
    oracle_gpu_seconds,
    static_peak_size,
)
from sim.scenario import Flash, Mmpp, Poisson
from skyhop.errors import ConfigError

HERE = Path(__file__).parent
SMALL = str(HERE / "small.toml")
ROOT = HERE.parents[1]


@pytest.fixture(scope="module")
def small() -> dict:
    return simulate(load_scenario(SMALL), seed=3)


def test_one_placement_implementation() -> None:
    # One lifecycle (dispatch.Dispatcher), one placement inside it; neither shell calls
    # place() itself.
    assert dispatch.place is placement.place
    assert engine.Dispatcher is dispatch.Dispatcher and broker.Dispatcher is dispatch.Dispatcher
    assert not hasattr(engine, "place") and not hasattr(broker, "place")


def test_same_seed_same_report_byte_for_byte(small: dict) -> None:
    assert dumps(simulate(load_scenario(SMALL), seed=3)) == dumps(small)
    assert dumps(simulate(load_scenario(SMALL), seed=4)) != dumps(small)


def test_same_bytes_in_another_process_with_another_hash_seed(tmp_path: Path,
                                                             small: dict) -> None:
    out = tmp_path / "r.json"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-m", "skyhop", "simulate", "--scenario", SMALL,
                    "--seed", "3", "--report", str(out)], check=True, env=env, cwd=ROOT,
                   capture_output=True)
    assert out.read_text() == dumps(small)


def test_cli_runs_the_clairvoyant_yardstick_and_names_it_when_asked_for_another() -> None:
    def cli(autoscaler: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "skyhop", "simulate", "--scenario", SMALL,
                               "--autoscaler", autoscaler], cwd=ROOT, capture_output=True,
                              text=True)

    ran = cli("clairvoyant")
    assert ran.returncode == 0 and "autoscaler=clairvoyant" in ran.stdout, ran.stderr
    refused = cli("oracle")
    assert refused.returncode != 0 and "clairvoyant" in refused.stdout + refused.stderr


def test_report_has_the_promised_fields(small: dict) -> None:
    for key in ("requests", "slo_met_fraction", "feasible_fraction", "latency_ms",
                "offload_fraction", "cloud_gpu_seconds", "scale_events", "placement_flaps",
                "series", "models", "windows"):
        assert key in small
    assert set(small["latency_ms"]) == {"p50", "p99"}
    assert sum(small["outcomes"].values()) == small["requests"] > 2000  # every one answered
    assert small["slo_met_fraction"] <= small["feasible_fraction"] <= 1
    series = small["series"]
    assert len(series["t_s"]) == len(series["slo_met_fraction"]) == 8  # 40 s in 5 s steps
    assert set(series["arrivals_per_s"]) == {"detect", "ocr", "caption"}
    assert small["windows"]["crowd"]["requests"] > 0
    assert small["cloud_gpu_seconds"] >= 40 * 1  # at least min_gpus for the whole run


def test_deadline_beats_round_robin_on_the_same_arrivals(small: dict) -> None:
    rr = simulate(load_scenario(SMALL), policy="round-robin", seed=3)
    assert rr["requests"] == small["requests"]
    assert small["slo_met_fraction"] > rr["slo_met_fraction"]


def test_every_refusal_is_audited_and_load_is_not_called_infeasible() -> None:
    """detect at 90/s with a 110 ms budget overloads the small fleet's fast nodes, which
    meet that budget when idle: its refusals are load (OVERLOADED). INFEASIBLE is left
    for what no node can make (here, a request rescued from a failed node with 162 ms
    left), and the audit (placement.fits_anywhere) finds a fitting node for no refusal."""
    spec = load_scenario(SMALL)
    models = tuple(m.model_copy(update={"budget_ms": 110.0}) if m.name == "detect" else m
                   for m in spec.models)
    arrivals = tuple(a.model_copy(update={"rate": 90.0}) if isinstance(a, Poisson) else a
                     for a in spec.arrivals)
    report = simulate(spec.model_copy(update={"models": models, "arrivals": arrivals}), seed=3)
    assert report["refused"].get("OVERLOADED", 0) > 10
    assert report["refused"].get("INFEASIBLE", 0) * 10 < report["refused"]["OVERLOADED"]
    assert sum(report["refused_with_fit"].values()) == 0


def test_failures_are_rescued(small: dict) -> None:
    assert small["redispatched"] > 0  # work of the nodes that died was placed again


@pytest.mark.parametrize("autoscaler", ["reactive", "static-peak", "clairvoyant"])
def test_autoscaler_baselines_run(autoscaler: str) -> None:
    r = simulate(load_scenario(SMALL), autoscaler=autoscaler, seed=3)
    assert r["autoscaler"] == autoscaler and r["requests"] > 2000
    if autoscaler == "static-peak":
        assert r["scale_events"] == 0 and r["static_pool"] >= 1
    if autoscaler == "clairvoyant":  # the pool it asked for is the planned one
        assert r["pool_peak"] == max(clairvoyant_targets(load_scenario(SMALL)))


# -- scenarios ------------------------------------------------------------------------------


def expected_requests(spec) -> float:
    total = 0.0
    for a in spec.arrivals:
        if isinstance(a, Poisson):
            total += a.rate * spec.duration_s
        elif isinstance(a, Mmpp):  # stationary mix of the states
            total += sum(r * d for r, d in zip(a.rates, a.dwell_s, strict=True)) \
                / sum(a.dwell_s) * spec.duration_s
        elif isinstance(a, Flash):
            total += a.base * spec.duration_s + (a.peak - a.base) * (
                a.ramp_s / 2 + a.hold_s + a.decay_s / 2)
        else:  # diurnal over whole periods: the mean
            total += a.mean * spec.duration_s
    return total


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_scenarios_have_the_promised_size(name: str) -> None:
    spec = load_scenario(name)
    assert sum(e.count for e in spec.edges) >= 1000
    assert 0 < spec.cloud.max_gpus <= 100
    assert len(spec.models) == 3 and len({m.budget_ms for m in spec.models}) >= 2
    assert expected_requests(spec) >= 100_000
    assert spec.cloud.min_gpus <= static_peak_size(spec) <= spec.cloud.max_gpus


def test_static_peak_planner() -> None:
    """With no edges the planner is the autoscaler's queueing model at the peak rate; edges
    that can make the budget take load off the cloud; more load needs more workers."""
    base = {"name": "p", "duration_s": 100, "cloud": {"speed": 2.0, "concurrency": 2,
                                                       "rtt_ms": 5.0, "max_gpus": 100},
            "models": [{"name": "m", "budget_ms": 400, "service_ms": 100, "cv": 0.2,
                        "request_kb": 0, "reply_kb": 0}]}

    def size(rate: float, edges: int = 0) -> int:
        spec = Scenario.model_validate(base | {
            "arrivals": [{"kind": "poisson", "model": "m", "rate": rate}],
            "edges": [{"gpu": "e", "count": edges, "speed": 1.0}] if edges else []})
        return static_peak_size(spec)

    demand = ModelDemand(model="m", cloud_requests=0, service_ms=50, p95_ms=50 * 1.33,
                         budget_ms=400, network_ms=5)
    assert size(100) == workers_needed((demand,), {"m": 100.0}, 2, ScaleConfig())
    assert size(100, edges=20) < size(100) < size(200)


def test_clairvoyant_bound_follows_the_need() -> None:
    """Constant load: the clairvoyant pool is the static one. A flash crowd: it pays the
    peak only while the crowd lasts, and never less than ``min_gpus``."""
    steady = load_scenario("steady")
    assert oracle_gpu_seconds(steady) == static_peak_size(steady) * steady.duration_s
    crowd = load_scenario("flash-crowd")
    bound = oracle_gpu_seconds(crowd)
    assert crowd.cloud.min_gpus * crowd.duration_s < bound
    assert bound < 0.5 * static_peak_size(crowd) * crowd.duration_s


def test_clairvoyant_schedule_asks_a_cold_start_ahead() -> None:
    """The schedule holds each second's need from a lead (cold start + one interval)
    before it, so a worker asked for then is up when the need comes."""
    crowd = load_scenario("flash-crowd")
    needs, plan = needs_per_second(crowd), clairvoyant_targets(crowd)
    lead = int(crowd.cloud.cold_start_s + crowd.cloud.autoscale_interval_s)
    first_need = next(t for t, n in enumerate(needs) if n > crowd.cloud.min_gpus)
    first_ask = next(t for t, n in enumerate(plan) if n > crowd.cloud.min_gpus)
    assert first_ask == first_need - lead
    assert all(p >= max(n, crowd.cloud.min_gpus) for p, n in zip(plan, needs, strict=True))
    assert max(plan) == static_peak_size(crowd)


def test_bad_scenarios_fail_with_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no scenario"):
        load_scenario("no-such-scenario")
    bad = tmp_path / "bad.toml"
    bad.write_text((HERE / "small.toml").read_text().replace('model = "ocr"', 'model = "ghost"'))
    with pytest.raises(ConfigError, match="unknown model 'ghost'"):
        load_scenario(bad)
    bad.write_text("name = 1")
    with pytest.raises(ConfigError, match="name"):
        load_scenario(bad)


# -- arrival processes ----------------------------------------------------------------------


def arrivals(spec, seed: int = 1, end_s: float = 2000) -> list[float]:
    import random

    proc = make_process(spec, random.Random(seed), end_s * 1000, str(HERE))
    out = []
    while (nxt := proc.next()) is not None:
        out.append(nxt[0])
    return out


def test_poisson_and_mmpp_rates() -> None:
    n = len(arrivals(Poisson(kind="poisson", model="m", rate=20)))
    assert abs(n - 40_000) < 4 * math.sqrt(40_000)
    mm = Mmpp(kind="mmpp", model="m", rates=(10.0, 50.0), dwell_s=(30.0, 10.0))
    n = len(arrivals(mm))
    assert 0.8 * 40_000 < n < 1.2 * 40_000  # (10 × 30 + 50 × 10) / 40 = 20 per second


def test_flash_crowd_shape() -> None:
    f = Flash(kind="flash", model="m", base=10, peak=100, start_s=100, ramp_s=100, hold_s=100,
              decay_s=100)
    times = arrivals(f, end_s=500)
    per_100s = [sum(1 for t in times if i * 1e5 <= t < (i + 1) * 1e5) for i in range(5)]
    assert per_100s[0] == pytest.approx(1000, rel=0.15)  # base
    assert per_100s[2] == pytest.approx(10_000, rel=0.05)  # held at the peak
    assert per_100s[1] == pytest.approx(5_500, rel=0.08)  # linear ramp: the mean
    assert per_100s[4] == pytest.approx(1000, rel=0.15)


def test_trace_replay() -> None:
    spec = load_scenario(SMALL).arrivals[-1]
    times = arrivals(spec, end_s=40)
    rows = (HERE / "small_trace.csv").read_text().splitlines()[1:]
    assert len(times) == sum(1 for r in rows if float(r.split(",")[0]) < 40)
    assert times == sorted(times)


def _batching(scenario: Scenario, max_batch: int, cost: float, gpus: int) -> Scenario:
    models = tuple(m.model_copy(update={"max_batch": max_batch, "batch_cost": cost})
                   for m in scenario.models)
    cloud = scenario.cloud.model_copy(update={"max_gpus": gpus})
    return scenario.model_copy(update={"models": models, "cloud": cloud})


def test_nodes_that_batch_serve_more_and_the_broker_sees_it() -> None:
    # Each request past the first adds 30 % of a lone run: the agent's rule and the
    # broker's curve (skyhop.batching) turn that into met deadlines and fewer GPUs.
    base = load_scenario(SMALL)
    alone = simulate(_batching(base, 1, 1.0, 1), seed=3)
    batched = simulate(_batching(base, 8, 0.3, 1), seed=3)
    assert batched["slo_missed"] < alone["slo_missed"]
    pool_alone = simulate(_batching(base, 1, 1.0, 10), seed=3)
    pool_batched = simulate(_batching(base, 8, 0.3, 10), seed=3)
    assert pool_batched["slo_met_fraction"] >= pool_alone["slo_met_fraction"]
    assert pool_batched["cloud_gpu_seconds"] < 0.9 * pool_alone["cloud_gpu_seconds"]
