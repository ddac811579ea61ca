"""Where a request runs: ``place(fleet, ask, now_ms, rng, ...) -> Decision``. Pure.

Policies (``--policy``):

- ``deadline`` (default): predict completion on every candidate —
  queue wait + service time (p95) + round trip + payload transfer — and take the
  cheapest that meets ``margin × remaining budget``: any edge before any cloud node,
  then the earliest predicted finish. ``INFEASIBLE`` at once when none can.
- ``round-robin``, ``least-connection``, ``weighted`` (by measured throughput):
  the usual baselines; they ignore the budget.

Every policy only picks among live nodes that serve the model and have credit
(outstanding < the capacity they report), so a node is never sent more than it
said it can hold.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from cloud_broker.fleet import Fleet, NodeView
from skyhop.errors import ErrorCode

POLICIES = ("deadline", "round-robin", "least-connection", "weighted")


@dataclass(frozen=True)
class Ask:
    """What placement needs to know about one request."""

    model: str
    size: int  # sealed body bytes
    remaining_ms: float  # budget left now
    priority: int = 0
    exclude: frozenset[str] = frozenset()  # nodes that already failed this request


@dataclass(frozen=True)
class Decision:
    node: str | None
    predicted_ms: float = 0.0
    code: ErrorCode | None = None
    reason: str = ""

    @property
    def placed(self) -> bool:
        return self.node is not None


@dataclass
class PlacementState:
    """What a stateful baseline remembers between calls (round-robin's cursor)."""

    cursor: dict[str, int] = field(default_factory=lambda: defaultdict(int))


def predict_ms(view: NodeView, ask: Ask) -> float:
    """Predicted completion of ``ask`` on ``view``, from dispatch to reply received."""
    mean, p95 = view.service_ms(ask.model)
    slots = view.concurrency
    ahead = view.ahead()
    wait = 0.0 if ahead < slots else (ahead - slots + 1) / slots * mean
    return wait + p95 + view.link.predict_ms(ask.size)


def place(fleet: Fleet, ask: Ask, now_ms: float, rng: random.Random, *,
          policy: str = "deadline", margin: float = 0.9,
          state: PlacementState | None = None) -> Decision:
    live = [v for v in fleet.candidates(ask.model, now_ms) if v.node not in ask.exclude]
    if not live:
        if ask.model not in fleet.known_models:
            return Decision(None, code=ErrorCode.UNKNOWN_MODEL,
                            reason=f"no node has ever offered model {ask.model!r}")
        return Decision(None, code=ErrorCode.UNAVAILABLE,
                        reason=f"no live node serves {ask.model!r} right now")
    ready = [v for v in live if v.has_credit()]
    if not ready:
        return Decision(None, code=ErrorCode.OVERLOADED,
                        reason=f"all {len(live)} nodes serving {ask.model!r} are full")
    if policy == "deadline":
        return _deadline(ready, ask, margin)
    chooser = _CHOOSERS.get(policy)
    if chooser is None:
        raise ValueError(f"unknown policy {policy!r}; choose one of {POLICIES}")
    view = chooser(ready, ask, rng, state or PlacementState())
    return Decision(view.node, predict_ms(view, ask))


def _deadline(ready: list[NodeView], ask: Ask, margin: float) -> Decision:
    limit = margin * ask.remaining_ms
    best: tuple[bool, float, str] | None = None
    for view in ready:
        predicted = predict_ms(view, ask)
        if predicted > limit:
            continue
        key = (view.role != "edge", predicted, view.node)  # edge first, then soonest
        if best is None or key < best:
            best = key
    if best is None:
        fastest = min(predict_ms(v, ask) for v in ready)
        return Decision(None, fastest, ErrorCode.INFEASIBLE,
                        f"best predicted {fastest:.1f} ms > {limit:.1f} ms "
                        f"({margin:.0%} of {ask.remaining_ms:.1f} ms left)")
    return Decision(best[2], best[1])


def _round_robin(ready: list[NodeView], ask: Ask, rng: random.Random,
                 state: PlacementState) -> NodeView:
    i = state.cursor[ask.model] % len(ready)
    state.cursor[ask.model] += 1
    return ready[i]


def _least_connection(ready: list[NodeView], ask: Ask, rng: random.Random,
                      state: PlacementState) -> NodeView:
    return min(ready, key=lambda v: (v.ahead() / v.concurrency, v.node))


def _weighted(ready: list[NodeView], ask: Ask, rng: random.Random,
              state: PlacementState) -> NodeView:
    # Weight = throughput: parallel slots over mean service time (1 ms floor).
    weights = [v.concurrency / max(1.0, v.service_ms(ask.model)[0]) for v in ready]
    return rng.choices(ready, weights=weights)[0]


_CHOOSERS: dict[str, Callable[[list[NodeView], Ask, random.Random, PlacementState], NodeView]] = {
    "round-robin": _round_robin,
    "least-connection": _least_connection,
    "weighted": _weighted,
}
