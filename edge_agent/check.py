"""``skyhop check``: what an agent would run on this machine, before it joins a fleet.

    report = check_node(home, ["digits"], providers=None, gpu=None)
    report.ok            # False when a model did not load or an explicit GPU is missing
    report.as_dict()     # what ``skyhop check --json`` prints

The telemetry probe and the models are chosen and loaded exactly as the agent does it
(``builder.agent_probe``, ``builder.load_runner``), then each model is timed on its
catalog example input.
Nothing is downloaded: a model not on disk is reported with the command that fetches it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from edge_agent.builder import agent_probe, default_threads, load_runner
from edge_agent.config import AgentConfig, load
from edge_agent.runner import import_ort, zeros_for
from skyhop.errors import SkyhopError
from skyhop.home import Home
from skyhop.models import Catalog, model_path
from skyhop.stats import percentile

RUNS = 20  # timed runs per model, after the agent's own warm-up


@dataclass(frozen=True)
class ModelCheck:
    model: str
    provider: str = ""  # the execution provider ORT runs it on
    warmup_ms: float = 0.0  # the agent's last warm-up run: its first service-time prior
    run_ms: float = 0.0  # p50 of RUNS runs on its example input (else zeros, dims 1)
    error: str = ""


@dataclass(frozen=True)
class NodeCheck:
    onnxruntime: str
    available: tuple[str, ...]  # the providers this ONNX Runtime was built with
    probe: dict[str, Any] = field(default_factory=dict)  # kind, device, util, memory
    probe_error: str = ""
    models: tuple[ModelCheck, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.probe_error and not any(m.error for m in self.models)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"ok": self.ok}


def check_node(home: Home, models: list[str] | None, providers: list[str] | None,
               gpu: int | None, runs: int = RUNS) -> NodeCheck:
    """Probe and models as the agent would have them; ``models`` None: those on disk."""
    ort = import_ort()
    catalog = home.catalog()
    agent_cfg = load(home)
    if models is None:  # what the agent serves, else every model on disk
        models = agent_cfg.models or [
            e.name for e in catalog.models if model_path(e, home.models_dir).is_file()]
    probe, probe_error = _probe(gpu)
    threads = default_threads(agent_cfg)
    checks = tuple(_model(home, catalog, name, providers, threads, gpu, agent_cfg, runs)
                   for name in models)
    return NodeCheck(ort.__version__, tuple(ort.get_available_providers()), probe,
                     probe_error, checks)


def _probe(gpu: int | None) -> tuple[dict[str, Any], str]:
    try:
        probe = agent_probe(gpu)
    except SkyhopError as exc:
        return {}, str(exc)
    try:
        return asdict(probe.sample()), ""
    except SkyhopError as exc:
        return {"kind": probe.kind, "device": probe.device}, str(exc)
    finally:
        probe.close()


def _model(home: Home, catalog: Catalog, name: str, providers: list[str] | None,
           threads: int, gpu: int | None, agent_cfg: AgentConfig, runs: int) -> ModelCheck:
    try:
        entry = catalog.get(name)
        path = model_path(entry, home.models_dir)
        if not path.is_file():
            return ModelCheck(name, error=f"not on disk: run `skyhop models fetch {name}`")
        runner = load_runner(home, entry, path, providers, threads, gpu, agent_cfg)
        feed = entry.example() or zeros_for(runner.inputs)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            runner.run(feed)
            times.append((time.perf_counter() - start) * 1000)
    except SkyhopError as exc:
        return ModelCheck(name, error=str(exc))
    return ModelCheck(name, runner.provider, round(runner.warmup_ms or 0.0, 3),
                      round(percentile(times, 50), 3))
