"""Assemble an Agent from a fleet home and CLI choices (the agent's entry point).

Reads config and keys, fetches and loads each model, picks the telemetry probe.
Kept apart from agent.py so that tests can build an Agent from fakes instead.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

from edge_agent.agent import Agent
from edge_agent.config import AgentConfig, load
from edge_agent.probe import Probe, choose_probe, nvml_device
from edge_agent.runner import CUDA, TRT, ModelRunner, OnnxRunner
from skyhop.batching import NO_BATCHING, BatchPolicy
from skyhop.errors import ConfigError
from skyhop.home import Home
from skyhop.models import ModelEntry, fetch
from skyhop.protocol.topics import Topics, check_name

log = logging.getLogger("skyhop.agent")


def build_agent(
    home: Home,
    *,
    mqtt: str,
    node_id: str,
    models: list[str],
    role: str = "edge",
    providers: list[str] | None = None,
    concurrency: int | None = None,
    intra_op_threads: int | None = None,
    gpu: int | None = None,
    run_log: Path | None = None,
) -> Agent:
    if role not in ("edge", "cloud"):
        raise ConfigError(f"--role must be edge or cloud, not {role!r}")
    if not models:
        raise ConfigError("no models to serve: pass --models or set [agent] models in the "
                          "home's config.toml (skyhop models list shows the catalog)")
    check_name("node", node_id)
    config = home.config()
    agent_cfg = load(home, config)
    if concurrency is not None:
        agent_cfg = agent_cfg.model_copy(update={"concurrency": concurrency})
    home.worker_keys(time.time())  # fail at start, not at the first request
    probe = agent_probe(gpu)
    catalog = home.catalog()
    threads = intra_op_threads or default_threads(agent_cfg)
    runners = {}
    for name in models:
        entry = catalog.get(name)
        path = fetch(entry, home.models_dir)
        runners[name] = load_runner(home, entry, path, providers, threads, gpu, agent_cfg)
    if agent_cfg.concurrency is None:
        agent_cfg = agent_cfg.model_copy(
            update={"concurrency": device_concurrency(runners.values())})
    if agent_cfg.batching is None:
        agent_cfg = agent_cfg.model_copy(update={"batching": on_gpu(runners.values())})
    policies = {name: batch_policy(catalog.get(name), agent_cfg) for name in models}
    return Agent(
        node_id=node_id,
        mqtt_url=mqtt,
        runners=runners,
        key_source=lambda: home.worker_keys(time.time()),
        probe=probe,
        config=agent_cfg,
        tls=home.tls(mqtt, node_id),
        topics=Topics(config.prefix),
        role=role,
        run_log=run_log,
        batching=policies,
    )


def batch_policy(entry: ModelEntry, agent_cfg: AgentConfig) -> BatchPolicy:
    """The catalog's batching for ``entry``, as the ``[agent]`` section adjusts it. Off
    by default on a CPU: there one run already takes every core, and bench/batching.py
    measured 0.82-1.00x the throughput with it (docs/performance.md §Dynamic batching)."""
    if not agent_cfg.batching:
        return NO_BATCHING
    delay = agent_cfg.max_queue_delay_ms
    return BatchPolicy(entry.max_batch, entry.max_queue_delay_ms if delay is None else delay)


def default_threads(agent_cfg: AgentConfig) -> int:
    """ORT's CPU threads per model: the cores shared by the worker slots, since several
    agents may share a small board."""
    return max(1, (os.cpu_count() or 1) // (agent_cfg.concurrency or 1))


# On an H200, 4 requests at once on one CUDA session served 3.0x the detections and
# 2.7x the classifications of one at a time (docs/gpu.md, "What --concurrency buys").
GPU_CONCURRENCY = 4


def device_concurrency(runners: Iterable[ModelRunner]) -> int:
    """Requests run at once when the config does not say: on a GPU, several runs share
    the device and fill what one small batch leaves idle; on a CPU, ONNX Runtime already
    spreads one run over every core, so one at a time."""
    return GPU_CONCURRENCY if on_gpu(runners) else 1


def on_gpu(runners: Iterable[ModelRunner]) -> bool:
    return any(r.provider in (CUDA, TRT) for r in runners)


def load_runner(home: Home, entry: ModelEntry, path: Path, providers: list[str] | None,
                threads: int | None, gpu: int | None, agent_cfg: AgentConfig) -> OnnxRunner:
    """A catalog model loaded as an agent loads it (``skyhop check`` does the same)."""
    return OnnxRunner.load(
        entry.name, path, providers, threads, warmup=3, max_batch=entry.max_batch,
        example=entry.example(),
        device_id=gpu or 0, trt_fp16=agent_cfg.tensorrt_fp16,
        # A TensorRT engine takes minutes to build on a Jetson: build it once.
        trt_cache_dir=home.models_dir / "tensorrt",
    )


def agent_probe(gpu: int | None) -> Probe:
    """The telemetry probe for the GPU the models run on: ``gpu`` as CUDA numbers it,
    which NVML does not (``nvml_device``). An explicit ``gpu`` must be an NVML GPU;
    without one, the best probe there is, and no GPU's numbers if GPU 0 is unclear."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if gpu is not None:
        target = nvml_device(gpu, visible)
        if target is None:
            raise ConfigError(f"--gpu {gpu}, but CUDA_VISIBLE_DEVICES is empty: no GPU is visible")
        return choose_probe(prefer="nvml", nvml_index=target)
    try:
        target = nvml_device(0, visible)
    except ConfigError as exc:  # a CUDA_VISIBLE_DEVICES that NVML cannot follow
        log.warning("%s; no GPU telemetry", exc)
        target = None
    return choose_probe(nvml_index=target)
