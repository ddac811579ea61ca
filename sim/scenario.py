"""Scenario files: a fleet, its network, models, arrivals, failures (docs/simulator.md).

``load_scenario("bursty")`` reads a built-in from ``sim/scenarios/``;
``load_scenario("path/to/file.toml")`` reads a file. Every table is validated here, so a
bad file fails with one line naming the key, before anything runs.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from skyhop.compat import tomllib
from skyhop.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EdgeClass(_Strict):
    """Edge nodes of one GPU class."""

    gpu: str  # the class name agents declare (NodeStatus.gpu)
    count: int = Field(ge=0)
    speed: float = Field(gt=0, description="relative speed: service = model.service_ms / speed")
    concurrency: int = Field(1, ge=1, le=64)
    queue_capacity: int = Field(64, ge=1)


class Cloud(_Strict):
    gpu: str = "nvidia-l4"
    speed: float = Field(4.0, gt=0)
    concurrency: int = Field(4, ge=1, le=64)
    queue_capacity: int = Field(64, ge=1)
    min_gpus: int = Field(1, ge=0)
    max_gpus: int = Field(100, ge=0)
    initial_gpus: int = Field(1, ge=0)
    cold_start_s: float = Field(45.0, ge=0)
    cold_start_cv: float = Field(0.15, ge=0)
    price_per_gpu_hour: float = Field(1.0, ge=0)
    cost_cap_per_hour: float | None = Field(None, gt=0)
    scale_to_zero: bool = False
    autoscale_interval_s: float = Field(5.0, gt=0)
    rtt_ms: float = Field(2.0, ge=0)
    bandwidth_mbps: float = Field(10_000.0, gt=0)


class Network(_Strict):
    sites: int = Field(1, ge=1, description="edges are spread evenly over this many sites")
    site_rtt_ms: tuple[float, float] = (20.0, 20.0)  # each site's RTT, drawn uniformly
    site_bandwidth_mbps: tuple[float, float] = (100.0, 100.0)
    jitter_ms: float = Field(0.0, ge=0, description="mean extra delay per message (exponential)")
    report_interval_s: float = Field(1.0, gt=0)
    report_delay_ms: float = Field(10.0, ge=0)
    node_timeout_s: float = Field(5.0, gt=0)
    death_notice_s: float = Field(1.5, ge=0, description="LWT: keepalive × 1.5 after a crash")
    tick_ms: float = Field(100.0, gt=0, description="the broker ticker's period")
    reply_grace_ms: float = Field(250.0, ge=0)


class Model(_Strict):
    name: str
    budget_ms: float = Field(gt=0)
    priority: int = Field(0, ge=0, le=7)
    service_ms: float = Field(gt=0, description="mean service on a speed-1.0 GPU")
    cv: float = Field(0.2, ge=0, description="spread of service time (lognormal)")
    request_kb: float = Field(10.0, ge=0)
    reply_kb: float = Field(1.0, ge=0)
    min_speed: float = Field(0.0, ge=0, description="edge classes slower than this lack memory")
    streams: int = Field(64, ge=1, description="origins (clients, cameras) per model")
    max_batch: int = Field(1, ge=1, description="most requests a node runs together")
    batch_cost: float = Field(
        1.0, ge=0, le=1,
        description="what each request past the first adds to a batch's run, as a share "
                    "of a lone run (1: batching gains nothing)")


class Poisson(_Strict):
    kind: Literal["poisson"]
    model: str
    rate: float = Field(ge=0)


class Mmpp(_Strict):
    """Markov-modulated Poisson: ``rates[i]`` for an exponential ``dwell_s[i]``, in turn."""

    kind: Literal["mmpp"]
    model: str
    rates: tuple[float, ...]
    dwell_s: tuple[float, ...]

    @model_validator(mode="after")
    def _same_length(self) -> Mmpp:
        if len(self.rates) != len(self.dwell_s) or not self.rates:
            raise ValueError("rates and dwell_s need the same, non-zero length")
        return self


class Flash(_Strict):
    """A flash crowd: ``base``, a linear ramp to ``peak``, a hold, a linear decay."""

    kind: Literal["flash"]
    model: str
    base: float = Field(ge=0)
    peak: float = Field(ge=0)
    start_s: float = Field(ge=0)
    ramp_s: float = Field(gt=0)
    hold_s: float = Field(ge=0)
    decay_s: float = Field(gt=0)


class Diurnal(_Strict):
    """``mean × (1 + amplitude × sin(2π (t / period_s + phase)))``."""

    kind: Literal["diurnal"]
    model: str
    mean: float = Field(ge=0)
    amplitude: float = Field(ge=0, le=1)
    period_s: float = Field(gt=0)
    phase: float = 0.0


class Trace(_Strict):
    """Replay a CSV with columns ``t_s,model`` (a header line; relative to the file)."""

    kind: Literal["trace"]
    file: str
    model: str | None = None  # only this model's rows; None: every row
    speedup: float = Field(1.0, gt=0)


Arrival = Annotated[Poisson | Mmpp | Flash | Diurnal | Trace, Field(discriminator="kind")]


class Failure(_Strict):
    """Edges that crash at ``at_s`` and come back after ``duration_s`` (0: never)."""

    at_s: float = Field(ge=0)
    duration_s: float = Field(0.0, ge=0)
    sites: tuple[int, ...] = ()  # every edge of these sites, or:
    fraction: float = Field(0.0, ge=0, le=1)  # this share of the edges, at random
    gpu: str | None = None  # only this class


class RandomFailures(_Strict):
    mtbf_s: float = Field(gt=0, description="mean time between failures, per edge")
    mttr_s: float = Field(gt=0, description="mean time to recovery")


class Window(_Strict):
    name: str
    start_s: float = Field(ge=0)
    end_s: float = Field(gt=0)


class Scenario(_Strict):
    name: str
    description: str = ""
    duration_s: float = Field(gt=0)
    series_interval_s: float = Field(5.0, gt=0)
    edges: tuple[EdgeClass, ...] = ()
    cloud: Cloud = Cloud()
    network: Network = Network()
    models: tuple[Model, ...]
    arrivals: tuple[Arrival, ...]
    failures: tuple[Failure, ...] = ()
    random_failures: RandomFailures | None = None
    windows: tuple[Window, ...] = ()
    base_dir: str = Field("", description="where relative trace files are; set on load")

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError("model names must be unique")
        for a in self.arrivals:
            if a.model is not None and a.model not in names:
                raise ValueError(f"arrivals name unknown model {a.model!r}")
        gpus = [e.gpu for e in self.edges] + [self.cloud.gpu]
        if len(set(gpus)) != len(gpus):
            raise ValueError("GPU class names must be unique (edges and cloud)")
        return self

    def model(self, name: str) -> Model:
        return next(m for m in self.models if m.name == name)


BUILTIN = ("steady", "bursty", "flash-crowd", "diurnal", "edge-outage")


def builtin_names() -> tuple[str, ...]:
    return BUILTIN


def load_scenario(name_or_path: str | Path) -> Scenario:
    """A built-in scenario by name, or a scenario file by path."""
    text, base = _read(str(name_or_path))
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{name_or_path}: not valid TOML: {exc}") from None
    data.setdefault("base_dir", base)
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                           for e in exc.errors())
        raise ConfigError(f"{name_or_path}: {detail}") from None


def _read(name: str) -> tuple[str, str]:
    if name in BUILTIN:
        res = resources.files("sim") / "scenarios" / f"{name}.toml"
        return res.read_text(), ""
    path = Path(name)
    if not path.is_file():
        raise ConfigError(f"no scenario {name!r}: name a file or one of {', '.join(BUILTIN)}")
    return path.read_text(), str(path.parent)
