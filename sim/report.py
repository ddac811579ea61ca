"""What a simulation run measured, and the JSON report it writes (docs/simulator.md §Report).

``Recorder`` is fed by the engine (arrivals, placements, terminal replies, pool samples);
``Recorder.report()`` returns plain data with floats rounded, so that one seed gives one
report, byte for byte (``dumps``).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sim.nodes import SimRequest
from sim.scenario import Scenario
from skyhop.stats import percentile

OK = "OK"


def _r(x: float, digits: int = 4) -> float:
    return round(float(x), digits)


@dataclass
class Tally:
    """Counts for a set of requests (a model, a window, everything)."""

    requests: int = 0
    feasible: int = 0
    ok: int = 0
    met: int = 0
    cloud: int = 0  # OK results run on the cloud
    codes: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)

    def summary(self, with_latency: bool = True) -> dict[str, Any]:
        n = max(1, self.requests)
        out: dict[str, Any] = {
            "requests": self.requests,
            "slo_met_fraction": _r(self.met / n, 6),
            "feasible_fraction": _r(self.feasible / n, 6),
            "slo_met_of_feasible": _r(self.met / self.feasible, 6) if self.feasible else 1.0,
            "slo_missed": self.requests - self.met,
            "offload_fraction": _r(self.cloud / self.ok, 6) if self.ok else 0.0,
        }
        if with_latency:
            out["latency_ms"] = {"p50": _r(percentile(self.latencies, 50), 3),
                                 "p99": _r(percentile(self.latencies, 99), 3)}
        out["outcomes"] = dict(sorted(self.codes.items()))
        return out


class Recorder:
    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.total = Tally()
        self.models = {m.name: Tally() for m in scenario.models}
        self.windows = [(w.name, w.start_s * 1000, w.end_s * 1000, Tally())
                        for w in scenario.windows]
        self.step_ms = scenario.series_interval_s * 1000
        buckets = max(1, math.ceil(scenario.duration_s * 1000 / self.step_ms))
        self.buckets = buckets
        names = [m.name for m in scenario.models]
        self.arrivals = {m: [0] * buckets for m in names}
        self.cloud_demand = [0] * buckets
        self.met = [0] * buckets
        self.requests = [0] * buckets
        self.offloaded = [0] * buckets
        self.pool: dict[str, list[float]] = {"ready": [], "booting": [], "target": []}
        self.flaps = 0
        self.pulled_back = 0
        self.redispatched = 0
        # Placement's refusals by code, and those of them a node in the broker's view
        # could have met (placement.fits_anywhere): a false INFEASIBLE is a defect.
        self.refused: Counter[str] = Counter()
        self.refused_with_fit: Counter[str] = Counter()
        self.scale_events = 0
        self._tier: dict[tuple[str, str], str] = {}

    def _bucket(self, t: float) -> int:
        return min(self.buckets - 1, int(t // self.step_ms))

    def arrival(self, req: SimRequest) -> None:
        self.arrivals[req.model][self._bucket(req.arrival)] += 1

    def placed(self, req: SimRequest, where: str, cloud_wanted: bool, pulled_back: bool) -> None:
        key = (req.model, req.origin)
        last = self._tier.get(key)
        if last is not None and last != where:
            self.flaps += 1
        self._tier[key] = where
        self.pulled_back += pulled_back

    def wanted_cloud(self, req: SimRequest) -> None:
        self.cloud_demand[self._bucket(req.arrival)] += 1

    def terminal(self, req: SimRequest, code: str, latency: float) -> None:
        met = code == OK and latency <= req.budget
        tallies = [self.total, self.models[req.model]]
        tallies += [t for _, start, end, t in self.windows if start <= req.arrival < end]
        for t in tallies:
            t.requests += 1
            t.feasible += req.feasible
            t.codes[code] += 1
            if code == OK:
                t.ok += 1
                t.met += met
                t.cloud += req.where == "cloud"
                t.latencies.append(latency)
        b = self._bucket(req.arrival)
        self.requests[b] += 1
        self.met[b] += met
        self.offloaded[b] += code == OK and req.where == "cloud"

    def refusal(self, code: str, fit: bool) -> None:
        self.refused[code] += 1
        self.refused_with_fit[code] += fit

    def sample(self, ready: int, booting: int, target: int) -> None:
        self.pool["ready"].append(ready)
        self.pool["booting"].append(booting)
        self.pool["target"].append(target)

    def report(self, *, policy: str, autoscaler: str, seed: int, gpu_ms: float,
               extra: dict[str, Any]) -> dict[str, Any]:
        total = self.total.summary()
        step_s = self.step_ms / 1000
        series = {
            "t_s": [_r(i * step_s, 3) for i in range(self.buckets)],
            "arrivals_per_s": {m: [_r(x / step_s, 3) for x in v] for m, v in self.arrivals.items()},
            "cloud_demand_per_s": [_r(x / step_s, 3) for x in self.cloud_demand],
            "slo_met_fraction": [_r(m / r, 4) if r else 1.0 for m, r in
                                 zip(self.met, self.requests, strict=True)],
            "offload_fraction": [_r(o / r, 4) if r else 0.0 for o, r in
                                 zip(self.offloaded, self.requests, strict=True)],
            "pool": {k: v[: self.buckets] for k, v in self.pool.items()},
        }
        return {
            "scenario": self.scenario.name,
            "policy": policy,
            "autoscaler": autoscaler,
            "seed": seed,
            **total,
            "cloud_gpu_seconds": _r(gpu_ms / 1000, 3),
            "scale_events": self.scale_events,
            "placement_flaps": self.flaps,
            "pulled_back": self.pulled_back,
            "redispatched": self.redispatched,
            "refused": dict(sorted(self.refused.items())),
            "refused_with_fit": dict(sorted(self.refused_with_fit.items())),
            **extra,
            "models": {m: t.summary() for m, t in self.models.items()},
            "windows": {name: t.summary() for name, _, _, t in self.windows},
            "series": series,
        }


def dumps(report: dict[str, Any]) -> str:
    """The report as JSON text: stable key order and rounding, so equal runs are equal bytes."""
    return json.dumps(report, indent=2) + "\n"
