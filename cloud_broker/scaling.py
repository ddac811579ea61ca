"""What the live broker feeds the autoscaler. Pure.

    counts = dispatcher.demand.take(fleet.known_models)   # cloud_broker/demand.py
    ctx = scale_context(now_ms, counts, fleet, sla, view, config)
    target, state = scale(ctx, state)

The live broker and the simulator both build it here: per model, the requests whose
first placement wanted the cloud (``Decision.cloud_wanted``) and all requests since the
last call; the cloud's service time from the fleet's class estimates; the SLA budget;
the cloud link's best round trip and per-byte cost. No clock, no I/O: the broker passes
``now`` and its fleet view.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from cloud_broker.autoscaler import (
    ModelDemand,
    PoolView,
    ScaleConfig,
    ScaleContext,
    ScaleState,
    early_warning_rate,
    hold_ms,
)
from cloud_broker.demand import ModelCount
from cloud_broker.fleet import Fleet, Group
from cloud_broker.placement import CLOUD
from skyhop.protocol.messages import SlaConfig


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
