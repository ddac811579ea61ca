"""The ``static-peak`` baseline's pool size: what a capacity planner would buy up front.

For every second of the scenario: the expected arrival rate per model (an MMPP at its
high state), the edges alive then, a fluid split of the load over edge classes that can
meet each budget (at most ``EDGE_UTILISATION`` busy, slowest class first, as the
``deadline`` policy fills them), and the rest sized for the cloud with the same queueing
model the predictive autoscaler uses. The pool is the largest of those sizes.

The same per-second need gives two clairvoyant pools, so that "x % of static-peak" can be
read against what was possible: ``oracle_gpu_seconds``, a pool that knew the future and
started in no time (a bound no autoscaler reaches), and ``clairvoyant_targets``, one that
knew the future and asked for each worker a cold start ahead (the simulator's
``clairvoyant`` autoscaler: what perfect foresight buys when workers take time to boot).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from cloud_broker.autoscaler import ModelDemand, ScaleConfig, workers_needed
from sim.arrivals import rate_function, read_trace
from sim.scenario import Model, Scenario, Trace

EDGE_UTILISATION = 0.7  # a planner keeps edge queues short: 70 % busy at most
P95_Z = 1.65  # p95 of a lognormal service ≈ mean × (1 + 1.65 cv) for small cv


def static_peak_size(s: Scenario, margin: float = 0.9) -> int:
    return _bounded(s, max(needs_per_second(s, margin)))


def oracle_gpu_seconds(s: Scenario, margin: float = 0.9) -> float:
    """GPU-seconds of a pool holding exactly each second's need, never below ``min_gpus``."""
    return float(sum(_bounded(s, n) for n in needs_per_second(s, margin)[:int(s.duration_s)]))


def clairvoyant_targets(s: Scenario, margin: float = 0.9) -> list[int]:
    """Per second, the pool a clairvoyant autoscaler asks for: the highest need of the next
    lead (the mean cold start plus one autoscaler interval, the predictive lead), so each
    worker is asked for about when it must start booting."""
    needs = needs_per_second(s, margin)
    lead = math.ceil(s.cloud.cold_start_s + s.cloud.autoscale_interval_s)
    return [_bounded(s, max(needs[t:t + lead + 1])) for t in range(len(needs))]


def needs_per_second(s: Scenario, margin: float = 0.9) -> list[int]:
    """Cloud workers needed at t = 0, 1, … ``duration_s`` seconds."""
    rates = _rate_functions(s)
    out = []
    for t in range(int(s.duration_s) + 1):
        at = {m.name: sum(f(t) for f in rates[m.name]) for m in s.models}
        out.append(_workers(s, _cloud_rates(s, at, _alive(s, t), margin), margin))
    return out


def _bounded(s: Scenario, n: int) -> int:
    return max(s.cloud.min_gpus, min(s.cloud.max_gpus, n))


Rate = Callable[[float], float]  # requests/s at second t


def _rate_functions(s: Scenario) -> dict[str, list[Rate]]:
    out: dict[str, list[Rate]] = {m.name: [] for m in s.models}
    for a in s.arrivals:
        if isinstance(a, Trace):
            for model, f in _trace_rates(a, s.base_dir).items():
                out[model].append(f)
        else:
            rate = rate_function(a)
            assert rate is not None
            out[a.model].append(rate)
    return out


def _trace_rates(spec: Trace, base_dir: str) -> dict[str, Rate]:
    # A trace's rate: per-model counts in 10 s buckets.
    counts: dict[str, dict[int, int]] = {}
    for t_ms, model in read_trace(spec, base_dir):
        counts.setdefault(model, {}).setdefault(int(t_ms // 10_000), 0)
        counts[model][int(t_ms // 10_000)] += 1
    return {m: _bucket_rate(c) for m, c in counts.items()}


def _bucket_rate(counts: dict[int, int]) -> Rate:
    return lambda t: counts.get(int(t // 10), 0) / 10


def _alive(s: Scenario, t: float) -> dict[str, float]:
    """Share of each edge class alive at ``t`` (planned outages; random ones on average)."""
    share = {e.gpu: 1.0 for e in s.edges}
    if s.random_failures:
        rf = s.random_failures
        share = {g: rf.mtbf_s / (rf.mtbf_s + rf.mttr_s) for g in share}
    for f in s.failures:
        if f.at_s <= t < f.at_s + (f.duration_s or math.inf):
            lost = len(f.sites) / s.network.sites if f.sites else f.fraction
            for g in share:
                if f.gpu in (None, g):
                    share[g] *= 1 - lost
    return share


def _fits(s: Scenario, m: Model, speed: float, margin: float) -> float:
    """Share of sites from which a node of ``speed`` meets ``m``'s budget, idle."""
    p95 = m.service_ms / speed * (1 + P95_Z * m.cv)
    lo, hi = s.network.site_rtt_ms
    bw_lo, bw_hi = s.network.site_bandwidth_mbps
    transfer = (m.request_kb + m.reply_kb) * 1000 * 8 / (((bw_lo + bw_hi) / 2) * 1000)
    room = margin * m.budget_ms - p95 - transfer
    if hi <= lo:
        return 1.0 if lo <= room else 0.0
    return min(1.0, max(0.0, (room - lo) / (hi - lo)))


def _cloud_rates(s: Scenario, rates: dict[str, float], alive: dict[str, float],
                 margin: float) -> dict[str, float]:
    # Slot-seconds per second each class can give; tightest budgets take theirs first.
    room = {e.gpu: e.count * e.concurrency * EDGE_UTILISATION * alive[e.gpu] for e in s.edges}
    cloud = {}
    for m in sorted(s.models, key=lambda m: m.budget_ms):
        left = rates[m.name]
        for e in sorted(s.edges, key=lambda e: e.speed):
            if left <= 0 or e.speed < m.min_speed:
                continue
            service_s = m.service_ms / e.speed / 1000
            usable = room[e.gpu] * _fits(s, m, e.speed, margin)
            take = min(left, usable / service_s)
            room[e.gpu] -= take * service_s
            left -= take
        cloud[m.name] = left
    return cloud


def _workers(s: Scenario, cloud: dict[str, float], margin: float) -> int:
    c = s.cloud
    demand = tuple(
        ModelDemand(model=m.name, cloud_requests=0, service_ms=m.service_ms / c.speed,
                    p95_ms=m.service_ms / c.speed * (1 + P95_Z * m.cv), budget_ms=m.budget_ms,
                    network_ms=c.rtt_ms + (m.request_kb + m.reply_kb) * 8 / c.bandwidth_mbps)
        for m in s.models)
    cfg = ScaleConfig(margin=margin, max_size=c.max_gpus)
    return workers_needed(demand, cloud, c.concurrency, cfg)
