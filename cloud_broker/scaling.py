"""What the live broker feeds the autoscaler. Pure.

    counter = DemandCounter()
    wanted = wanted_cloud(decision, "digits", pool.models, pool_ready)  # per first placement
    counter.request("digits", budget_ms=50, cloud_wanted=wanted)
    counter.reply("digits", nbytes)                                     # per result
    ctx = scale_context(now_ms, counter.take(fleet.known_models), fleet, sla, view, config)
    target, state = scale(ctx, state)

The context is built the way the simulator builds its own (``cloud_broker/sim/engine.py``,
``_autoscale``): per model, the requests whose first placement wanted the cloud
(``Decision.cloud_wanted``) and all requests since the last call; the cloud's service
time from the fleet's class estimates; the SLA budget; the cloud link's best round trip
and per-byte cost. No clock, no I/O: the broker passes ``now`` and its fleet view.
"""

from __future__ import annotations

import math
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, fields, replace

from cloud_broker.autoscaler import (
    ModelDemand,
    PoolView,
    ScaleConfig,
    ScaleContext,
    ScaleState,
    early_warning_rate,
    hold_ms,
)
from cloud_broker.fleet import Fleet, Group
from cloud_broker.placement import CLOUD, Decision
from skyhop.home import AutoscaleConfig
from skyhop.messages import SlaConfig

SIZE_ALPHA = 0.2  # smoothing of message sizes: one odd payload must not reprice the link


@dataclass
class ModelCount:
    cloud_wanted: int = 0  # first placements that wanted the cloud, since the last take()
    requests: int = 0  # all first placements since the last take()
    budget_ms: float = 0.0  # the latest request's budget: the model's when it has no SLA
    message_bytes: float = 0.0  # request + reply, smoothed: prices the link to the cloud


class DemandCounter:
    """Per-model counts since the last ``take()``; budgets and sizes are kept across."""

    def __init__(self) -> None:
        self._counts: dict[str, ModelCount] = {}

    def _of(self, model: str) -> ModelCount:
        count = self._counts.get(model)
        if count is None:
            count = self._counts[model] = ModelCount()
        return count

    def request(self, model: str, budget_ms: float, cloud_wanted: bool) -> None:
        """Count a request's first placement (a re-dispatch is not new demand)."""
        count = self._of(model)
        count.requests += 1
        count.cloud_wanted += cloud_wanted
        count.budget_ms = budget_ms

    def reply(self, model: str, message_bytes: int) -> None:
        count = self._of(model)
        if count.message_bytes == 0:
            count.message_bytes = message_bytes
        else:
            count.message_bytes += SIZE_ALPHA * (message_bytes - count.message_bytes)

    def take(self, known: Iterable[str] = ()) -> dict[str, ModelCount]:
        """The counts since the last call, and zero them. ``known`` models are included
        even without a request: the autoscaler needs a model's zeros to see its trend."""
        for model in known:
            self._of(model)
        out = {m: replace(c) for m, c in sorted(self._counts.items())}
        for count in self._counts.values():
            count.requests = count.cloud_wanted = 0
        return out


def wanted_cloud(decision: Decision, model: str, pool_models: Container[str],
                 pool_ready: int) -> bool:
    """Whether a first placement counts as cloud demand: ``Decision.cloud_wanted``, or a
    request nothing could take while the pool had no ready worker for a model it serves.
    An empty pool is in nobody's reach in the fleet view: without this a pool at zero
    (scale-to-zero, or before its first worker's birth) would never be asked to grow."""
    if decision.cloud_wanted:
        return True
    return not decision.placed and pool_ready == 0 and model in pool_models


def scale_context(now_ms: float, counts: Mapping[str, ModelCount], fleet: Fleet,
                  sla: Mapping[str, SlaConfig], pool: PoolView,
                  config: ScaleConfig) -> ScaleContext:
    """The autoscaler's input from what the broker counted and knows now."""
    models = tuple(model_demand(m, c, fleet, sla.get(m)) for m, c in counts.items())
    return ScaleContext(now_ms, models, pool, config)


def model_demand(model: str, count: ModelCount, fleet: Fleet,
                 sla: SlaConfig | None) -> ModelDemand:
    mean, p95 = cloud_service(fleet, model)
    budget = sla.budget_ms if sla is not None else count.budget_ms
    return ModelDemand(model=model, cloud_requests=count.cloud_wanted, requests=count.requests,
                       service_ms=mean, p95_ms=p95,
                       budget_ms=budget or ModelDemand.budget_ms,
                       network_ms=cloud_network(fleet, model, count.message_bytes))


def _cloud_groups(fleet: Fleet, model: str) -> list[Group]:
    """The model's cloud GPU classes the fleet has seen (kept when their workers go)."""
    idx = fleet.index(model)
    return [g for g in idx.groups.values() if g.role == CLOUD] if idx is not None else []


def cloud_service(fleet: Fleet, model: str) -> tuple[float, float]:
    """(mean, p95) of ``model`` on a cloud worker: the slowest cloud class's estimate,
    (0, 0) when no cloud worker ever offered it (the autoscaler then starts one to learn)."""
    estimates = [fleet.priors.get(g.gpu, model) for g in _cloud_groups(fleet, model)]
    return max(estimates, default=(0.0, 0.0))


def cloud_network(fleet: Fleet, model: str, message_bytes: float) -> float:
    """Round trip + transfer of a request and its reply over the best known cloud link.

    A link is known once a load report or a reply has priced it: a worker indexed before
    either has a link of 0 ms, which placement may take as a lower bound but which
    would price the cloud as free here. With none known, the groups' bounds (0 if none).
    """
    groups = _cloud_groups(fleet, model)
    known = [v.link.rtt_ms + message_bytes * v.link.ms_per_byte
             for g in groups for v in g.members if v.link.samples or v.load is not None]
    if known:
        return min(known)
    links = [(g.min_rtt_ms, g.min_ms_per_byte) for g in groups if g.min_rtt_ms < math.inf]
    if not links:
        return 0.0
    rtt, per_byte = min(links)
    return rtt + message_bytes * per_byte


def scale_config(config: AutoscaleConfig, margin: float) -> ScaleConfig:
    """The autoscaler's config from the home's ``[broker.autoscale]`` and the placement's
    margin; fields only the pool backend reads (backend, models, …) are left out."""
    shared = {f.name for f in fields(ScaleConfig)}
    values = {k: v for k, v in config.model_dump().items() if k in shared}
    return ScaleConfig(**values, margin=margin)


def reason(ctx: ScaleContext, old: int, new: int, state: ScaleState) -> str:
    """Why the target moved, as ``key=value`` pairs for the log line."""
    cfg, secs = ctx.config, ctx.config.interval_ms / 1000
    wanted = sum(m.cloud_requests for m in ctx.models) / secs
    requests = sum(m.requests for m in ctx.models) / secs
    parts = ["up" if new > old else "down", f"cloud_wanted={wanted:.1f}/s",
             f"requests={requests:.1f}/s", f"cold_start={state.cold_start_ms / 1000:.1f}s"]
    if cfg.policy == "predictive":
        parts.append(f"early_warning={early_warning_rate(state, cfg):.1f}/s")
        parts.append(f"hold={hold_ms(state, cfg) / 1000:.0f}s")
    if new == cfg.max_size:
        parts.append("at=max_size")
    elif new == cfg.min_size:
        parts.append("at=min_size")
    return ",".join(parts)
