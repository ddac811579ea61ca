"""The autoscaler on hand-built contexts: no pool, no clock."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloud_broker.autoscaler import (
    ModelDemand,
    PoolView,
    ScaleConfig,
    ScaleContext,
    ScaleState,
    scale,
    servers_needed,
    workers_needed,
)

STEP = 5_000.0  # ms between calls


def demand(rate: float, *, requests: float | None = None, service: float = 100.0,
           budget: float = 1000.0) -> tuple[ModelDemand, ...]:
    """One model asking ``rate`` requests/s of the cloud over one 5 s interval."""
    n = round(rate * STEP / 1000)
    total = n if requests is None else round(requests * STEP / 1000)
    return (ModelDemand("m", n, total, service, service * 1.5, budget, 2.0),)


def run(cfg: ScaleConfig, rates: list[float], *, size: int = 1, cold: tuple[float, ...] = (),
        all_rates: list[float] | None = None) -> list[int]:
    """Targets over a series of intervals, feeding each answer back as the pool size."""
    state: ScaleState | None = None
    targets, target = [], size
    for i, rate in enumerate(rates):
        requests = all_rates[i] if all_rates else None
        ctx = ScaleContext((i + 1) * STEP, demand(rate, requests=requests),
                           PoolView(target, 0, slots=4, cold_starts_ms=cold if i == 0 else ()),
                           cfg)
        target, state = scale(ctx, state)
        targets.append(target)
    return targets


# -- the queueing model -------------------------------------------------------------------


def test_erlang_c_matches_the_textbook() -> None:
    # a = 1 erlang, no wait allowed: C(3,1) = 0.091, C(4,1) = 0.020, C(5,1) = 0.0038.
    assert servers_needed(10, 0.1, 0.0, 0.99) == 5
    assert servers_needed(10, 0.1, 0.0, 0.95) == 4
    # Allowing a wait needs fewer servers; more load needs more.
    assert servers_needed(10, 0.1, 0.2, 0.99) < 5
    assert servers_needed(100, 0.1, 0.0, 0.99) > servers_needed(50, 0.1, 0.0, 0.99)
    assert servers_needed(0, 0.1, 0.0, 0.99) == 0


@given(rate=st.floats(0.1, 2000), service=st.floats(0.001, 2), wait=st.floats(0, 2))
def test_servers_are_enough_and_stable(rate: float, service: float, wait: float) -> None:
    c = servers_needed(rate, service, wait, 0.99)
    assert c > rate * service  # a stable queue: utilisation below 1


def test_workers_pool_the_models_and_count_slots() -> None:
    cfg = ScaleConfig()
    models = (ModelDemand("a", 0, 0, 100, 150, 1000), ModelDemand("b", 0, 0, 20, 30, 200))
    assert workers_needed(models, {"a": 0.0, "b": 0.0}, 4, cfg) == 0
    one = workers_needed(models, {"a": 40.0, "b": 0.0}, 4, cfg)
    both = workers_needed(models, {"a": 40.0, "b": 400.0}, 4, cfg)
    assert 0 < one < both
    assert workers_needed(models, {"a": 40.0}, 1, cfg) > one  # 1 slot per worker
    never = (ModelDemand("x", 0, 0, 0.0, 0.0, 100),)
    assert workers_needed(never, {"x": 5.0}, 4, cfg) == 1  # unmeasured: one worker learns


def test_a_tight_budget_waits_only_behind_work_due_first() -> None:
    """Workers serve earliest deadline first: a few 200 ms requests among many 3 s ones
    wait for a free slot, not behind the whole queue, so the pool need not be sized as
    if everything had the tight budget — but it is never smaller than the heavy model's
    own need, and an FCFS bound on the same load is no smaller."""
    cfg = ScaleConfig()
    heavy = ModelDemand("caption", 0, 0, 150, 220, 3000)
    tight = ModelDemand("detect", 0, 0, 10, 15, 200)
    rates = {"caption": 250.0, "detect": 200.0}
    mixed = workers_needed((heavy, tight), rates, 4, cfg)
    alone = workers_needed((heavy,), {"caption": 250.0}, 4, cfg)
    as_if_all_tight = workers_needed((replace(heavy, budget_ms=200), tight), rates, 4, cfg)
    assert alone <= mixed < as_if_all_tight
    lam, mean_s = 450 * cfg.headroom, (250 * 0.150 + 200 * 0.010) / 450
    assert servers_needed(lam, mean_s, 0.15, 0.99, ahead_rate=200 * cfg.headroom) < \
        servers_needed(lam, mean_s, 0.15, 0.99)


# -- predictive -----------------------------------------------------------------------------


def test_steady_demand_gives_a_steady_pool() -> None:
    targets = run(ScaleConfig(), [40.0] * 30)
    assert len(set(targets[3:])) == 1 and targets[-1] >= 2


def test_a_ramp_is_met_a_cold_start_ahead() -> None:
    """Demand rising 4 req/s every 5 s: the pool is sized for where demand will be when
    a worker started now is up, not for where it is."""
    rates = [10.0 + 4 * i for i in range(20)]
    cfg = ScaleConfig(cold_start_prior_ms=30_000)
    targets = run(cfg, rates)
    now_need = [workers_needed(demand(r), {"m": r}, 4, cfg) for r in rates]
    later_need = now_need[6:] + [now_need[-1]] * 6  # need 30 s (6 intervals) later
    assert all(t >= n for t, n in zip(targets[5:], later_need[5:], strict=True))
    assert targets[10] > now_need[10]


def test_rise_in_all_requests_counts_before_the_cloud_sees_it() -> None:
    """The edges absorb a crowd's start: cloud demand is flat, total requests climb."""
    quiet = run(ScaleConfig(), [5.0] * 10, all_rates=[100.0] * 10)
    crowd = run(ScaleConfig(), [5.0] * 10, all_rates=[100.0 + 30 * i for i in range(10)])
    assert crowd[-1] > quiet[-1] + 2


def test_scale_down_waits_and_has_hysteresis() -> None:
    cfg = ScaleConfig(downscale_delay_ms=60_000)
    targets = run(cfg, [80.0] * 5 + [10.0] * 20)
    high = targets[4]
    assert targets[5:5 + 11] == [high] * 11  # held for the 60 s delay (12 intervals)
    assert targets[-1] < high
    small_dip = run(cfg, [80.0] * 5 + [76.0] * 20)
    assert small_dip[-1] == small_dip[4]  # within the hysteresis band: no change


def test_a_worker_goes_once_unneeded_for_the_hold() -> None:
    """A sliding window: after the hold the pool follows the need down step by step,
    instead of waiting a whole new delay at every step; the pool one starts with is held
    for the hold too (no history is not idleness)."""
    fall = run(ScaleConfig(), [200.0] * 5 + [10.0] * 25)
    assert fall[4:11] == [fall[4]] * 7 and fall[13] == fall[-1] < fall[4]
    assert run(ScaleConfig(), [0.0] * 12, size=3)[:7] == [3] * 7


def test_bursts_that_recur_keep_their_pool_a_crowd_that_leaves_does_not() -> None:
    """A burst back 40 s after its pool was released, with 30 s cold starts, is a regret
    (a worker held 40 s costs less than a boot and its misses): the hold grows to two
    leads (cold start + interval) and the next lulls keep the pool. A single crowd is
    let go."""
    cold = (30_000.0,) * 30
    bursts = run(ScaleConfig(), [10.0] * 8 + ([300.0] * 3 + [10.0] * 8) * 4, cold=cold)
    crowd = run(ScaleConfig(), [10.0] * 8 + [300.0] * 3 + [10.0] * 30, cold=cold)
    peak = max(bursts)
    assert min(bursts[8:19]) < peak  # the first lull: released after 30 s, then regretted
    assert min(bursts[30:]) == peak  # later lulls (40 s) are held through
    assert crowd[-1] == 1 and max(crowd) == peak


def test_requests_that_jump_twice_within_two_leads_keep_the_pool_before_any_regret() -> None:
    """Two bursts 40 s apart, the lull between them shorter than the 30 s hold: nothing
    was released, so nothing was regretted. The second jump is the evidence all the
    same, and the next, longer lull (50 s) is held through; a single burst is not."""
    cold = (30_000.0,) * 30
    head = [10.0] * 8 + [300.0] * 3 + [10.0] * 5 + [300.0] * 3
    twice = run(ScaleConfig(), head + [10.0] * 10 + [300.0] * 3, cold=cold)
    peak = max(twice)
    assert min(twice[19:29]) >= 0.8 * peak  # the 50 s lull is held: the third burst is met
    once = run(ScaleConfig(), [10.0] * 16 + [300.0] * 3 + [10.0] * 10, cold=cold)
    assert max(once) == peak and once[-1] == 1  # one jump: released after the 30 s hold


def test_no_worker_goes_while_requests_rise() -> None:
    """Cloud demand falls but all requests keep climbing: a ramp's dip is not its end."""
    cfg = ScaleConfig(early_warning=0)  # the guard alone, not the early warning's demand
    rising = run(cfg, [80.0] * 5 + [10.0] * 20, all_rates=[100.0 + 3 * i for i in range(25)])
    flat = run(cfg, [80.0] * 5 + [10.0] * 20, all_rates=[100.0] * 25)
    assert min(rising) == rising[4] > flat[-1]


def test_bounds_cost_cap_and_scale_to_zero() -> None:
    assert max(run(ScaleConfig(max_size=5), [500.0] * 5)) == 5
    capped = ScaleConfig(price_per_gpu_hour=2.0, cost_cap_per_hour=7.0)
    assert max(run(capped, [500.0] * 5)) == 3  # 3 × 2 ≤ 7
    assert min(run(ScaleConfig(min_size=3), [0.0] * 30)) == 3
    to_zero = ScaleConfig(scale_to_zero=True, idle_to_zero_ms=30_000, downscale_delay_ms=10_000)
    targets = run(to_zero, [0.0] * 20, size=2)
    assert targets[-1] == 0 and targets[2] > 0  # only after the idle period
    assert run(ScaleConfig(), [0.0] * 30)[-1] == 1  # without it, one worker stays


def test_cold_start_is_learnt_from_the_pool() -> None:
    rates = [10.0 + 4 * i for i in range(12)]
    short = run(ScaleConfig(), rates, cold=(5_000.0,) * 20)
    long = run(ScaleConfig(), rates, cold=(120_000.0,) * 20)
    assert long[-1] > short[-1]  # a longer lead looks further up the ramp
    cfg = ScaleConfig(cold_start_prior_ms=60_000)
    _, state = scale(ScaleContext(STEP, demand(1), PoolView(1, 0, cold_starts_ms=(10_000.0,)),
                                  cfg))
    assert state.cold_start_ms == 10_000  # the first measurement replaces the prior
    _, state = scale(ScaleContext(2 * STEP, demand(1),
                                  PoolView(1, 0, cold_starts_ms=(20_000.0,)), cfg), state)
    assert state.cold_start_ms == pytest.approx(10_000 + 0.3 * (20_000 - 10_000))  # then EWMA


def test_scale_is_pure() -> None:
    ctx = ScaleContext(STEP, demand(50), PoolView(2, 1, slots=4), ScaleConfig())
    first = scale(ctx, None)
    assert scale(ctx, None) == first
    again = scale(ctx, first[1])
    assert scale(ctx, first[1]) == again  # the state passed in was not changed


# -- baselines ------------------------------------------------------------------------------


def test_reactive_waits_30_s_up_and_600_s_down() -> None:
    cfg = ScaleConfig(policy="reactive")
    up = run(cfg, [100.0] * 12)
    assert up[:5] == [1] * 5  # the wish to grow must persist 30 s first
    assert up[8] > 1
    down = run(cfg, [100.0] * 10 + [0.0] * 130, size=1)
    peak = max(down)
    first_lower = next(i for i, t in enumerate(down) if i > 10 and t < peak)
    assert (first_lower - 10) * STEP >= 600_000 - 30_000 - STEP  # after ~600 s (look-back)


def test_static_peak_never_moves() -> None:
    cfg = ScaleConfig(policy="static-peak", static_size=7)
    assert set(run(cfg, [0.0, 500.0, 0.0, 1000.0])) == {7}


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="unknown autoscaler"):
        ScaleConfig(policy="magic")
    with pytest.raises(ValueError, match="min_size"):
        ScaleConfig(min_size=5, max_size=2)
