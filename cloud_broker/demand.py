"""Per-model demand since the last autoscaler call, counted by the dispatcher. Pure.

    counter = DemandCounter()
    wanted = wanted_cloud(decision, "digits", pool_models, pool_ready)  # per first placement
    counter.request("digits", budget_ms=50, cloud_wanted=wanted)
    counter.reply("digits", nbytes)                                     # per result
    counts = counter.take(fleet.known_models)         # -> scaling.scale_context(...)
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from dataclasses import dataclass, replace

from cloud_broker.placement import Decision

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
