"""Arrival processes: each yields (time ms, model) in order, from its own seeded rng.

    proc = make_process(spec, rng, end_ms, base_dir)
    while (nxt := proc.next()) is not None: ...

Poisson and MMPP draw exponential gaps; time-varying rates (flash crowd, diurnal) use
thinning (Lewis & Shedler): candidates at the peak rate, each kept with probability
rate(t) / peak; a trace replays a CSV.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Callable
from pathlib import Path

from sim.scenario import Arrival, Diurnal, Flash, Mmpp, Poisson, Trace
from skyhop.errors import ConfigError


class Process:
    """Base: ``next()`` returns the next (time ms, model), or None after ``end_ms``."""

    def __init__(self, model: str, rng: random.Random, end_ms: float) -> None:
        self.model, self.rng, self.end_ms, self.t_ms = model, rng, end_ms, 0.0

    def next(self) -> tuple[float, str] | None:
        raise NotImplementedError


class PoissonProcess(Process):
    def __init__(self, model: str, rate: float, rng: random.Random, end_ms: float) -> None:
        super().__init__(model, rng, end_ms)
        self.rate = rate

    def next(self) -> tuple[float, str] | None:
        if self.rate <= 0:
            return None
        self.t_ms += self.rng.expovariate(self.rate) * 1000
        return (self.t_ms, self.model) if self.t_ms < self.end_ms else None


class MmppProcess(Process):
    """Exponential sojourns in states with their own rates (memoryless, so a gap that
    crosses a state change is redrawn from the change)."""

    def __init__(self, spec: Mmpp, rng: random.Random, end_ms: float) -> None:
        super().__init__(spec.model, rng, end_ms)
        self.rates, self.dwell = spec.rates, spec.dwell_s
        self.state = 0
        self.state_end = rng.expovariate(1 / self.dwell[0]) * 1000

    def next(self) -> tuple[float, str] | None:
        while self.t_ms < self.end_ms:
            rate = self.rates[self.state]
            gap = self.rng.expovariate(rate) * 1000 if rate > 0 else math.inf
            if self.t_ms + gap <= self.state_end:
                self.t_ms += gap
                return (self.t_ms, self.model) if self.t_ms < self.end_ms else None
            self.t_ms = self.state_end
            self.state = (self.state + 1) % len(self.rates)
            self.state_end += self.rng.expovariate(1 / self.dwell[self.state]) * 1000
        return None


class ThinnedProcess(Process):
    def __init__(self, model: str, rate_at: Callable[[float], float], peak: float,
                 rng: random.Random, end_ms: float) -> None:
        super().__init__(model, rng, end_ms)
        self.rate_at, self.peak = rate_at, peak

    def next(self) -> tuple[float, str] | None:
        if self.peak <= 0:
            return None
        while True:
            self.t_ms += self.rng.expovariate(self.peak) * 1000
            if self.t_ms >= self.end_ms:
                return None
            if self.rng.random() * self.peak <= self.rate_at(self.t_ms / 1000):
                return self.t_ms, self.model


class TraceProcess(Process):
    def __init__(self, rows: list[tuple[float, str]], end_ms: float) -> None:
        super().__init__("", random.Random(0), end_ms)
        self.rows, self.i = rows, 0

    def next(self) -> tuple[float, str] | None:
        if self.i >= len(self.rows) or self.rows[self.i][0] >= self.end_ms:
            return None
        self.i += 1
        return self.rows[self.i - 1]


def flash_rate(spec: Flash) -> Callable[[float], float]:
    def rate(t: float) -> float:
        x = t - spec.start_s
        if x < 0:
            return spec.base
        if x < spec.ramp_s:
            return spec.base + (spec.peak - spec.base) * x / spec.ramp_s
        x -= spec.ramp_s
        if x < spec.hold_s:
            return spec.peak
        x -= spec.hold_s
        if x < spec.decay_s:
            return spec.peak + (spec.base - spec.peak) * x / spec.decay_s
        return spec.base

    return rate


def diurnal_rate(spec: Diurnal) -> Callable[[float], float]:
    def rate(t: float) -> float:
        return spec.mean * (1 + spec.amplitude * math.sin(2 * math.pi * (t / spec.period_s
                                                                         + spec.phase)))

    return rate


def rate_function(spec: Arrival) -> Callable[[float], float] | None:
    """Expected arrivals per second at t seconds (None for a trace: not known up front)."""
    if isinstance(spec, Poisson):
        return lambda t: spec.rate
    if isinstance(spec, Mmpp):
        return lambda t: max(spec.rates)  # a planner sizes for the high state
    if isinstance(spec, Flash):
        return flash_rate(spec)
    if isinstance(spec, Diurnal):
        return diurnal_rate(spec)
    return None


def make_process(spec: Arrival, rng: random.Random, end_ms: float,
                 base_dir: str = "") -> Process:
    if isinstance(spec, Poisson):
        return PoissonProcess(spec.model, spec.rate, rng, end_ms)
    if isinstance(spec, Mmpp):
        return MmppProcess(spec, rng, end_ms)
    if isinstance(spec, Flash):
        return ThinnedProcess(spec.model, flash_rate(spec), max(spec.base, spec.peak), rng,
                              end_ms)
    if isinstance(spec, Diurnal):
        return ThinnedProcess(spec.model, diurnal_rate(spec), spec.mean * (1 + spec.amplitude),
                              rng, end_ms)
    return TraceProcess(read_trace(spec, base_dir), end_ms)


def read_trace(spec: Trace, base_dir: str) -> list[tuple[float, str]]:
    path = Path(base_dir) / spec.file if base_dir else Path(spec.file)
    try:
        with path.open(newline="") as f:
            rows = [(float(r["t_s"]) * 1000 / spec.speedup, r["model"])
                    for r in csv.DictReader(f)]
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"trace {path}: {exc} (need a header t_s,model)") from None
    return sorted(r for r in rows if spec.model is None or r[1] == spec.model)
