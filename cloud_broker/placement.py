"""Where a request runs: ``place(fleet, ask, now_ms, rng, ...) -> Decision``. Pure.

The live broker and the simulator (``sim``) both call this function;
there is no other placement. Policies (``--policy``):

- ``deadline`` (default): predict completion on candidates — queue wait + service time
  + round trip + payload transfer (``predict_ms``) — and take the *cheapest* that meets
  ``margin × remaining budget``: any edge before any cloud node, and among edges the
  slowest GPU class that still makes it (fast GPUs stay free for the work only they
  can do); from ``Tuning.high_priority`` on, the earliest finish instead.

  * Queue wait follows the agent's non-preemptive earliest-deadline-first queue: what
    is running, our work due earlier, one job due later (the blocking term), and work
    we cannot see; each of ours costed at its expected service (``Fleet.dispatched``).
  * Service is a high quantile, ``mean + tail × (p95 − mean)``, measured per node and
    model, or its GPU class's prior while the node has too few runs.
  * Telemetry is stale by up to a report interval: the fleet adds what we placed and
    subtracts what we saw answered since the node's last report.
  * Priorities: below ``high_priority`` a request may not take a GPU group's last
    ``reserve`` share of idle nodes (trunk reservation), and the agent runs urgent
    work first (EDF), so high-priority, tight work finds room when the fleet is full.
  * Pull-back: when the cloud cannot make it (saturated, or still warming up), work
    goes to an edge that can. Hysteresis: a stream (model × origin) on the cloud comes
    back to the edge only after ``dwell_ms`` and with ``hysteresis`` slack to spare,
    so a stream near the edge's limit does not flap.
  * Refusals are honest: ``INFEASIBLE`` at once only when no node could make it even
    idle (a larger budget is needed); ``OVERLOADED`` when one could idle but none can
    under the current load, when all are full, or when the free ones are reserved for
    higher priorities. ``fits_anywhere`` is the exhaustive check the simulator holds
    every refusal to.
- ``round-robin``, ``least-connection``, ``weighted`` (by declared GPU capability),
  ``power-of-two`` (two random candidates, the shorter queue): the usual baselines;
  they ignore the budget.

Cost per decision does not grow with the fleet: candidates come from per-model,
per-(role, GPU class) indexes (``Fleet.index``); a group of up to ``Tuning.exhaustive``
nodes is evaluated whole, a larger one by ``Tuning.sample`` random members; a large
group whose best case (class prior, best link) misses the budget is skipped. Up to
``Tuning.exhaustive_model`` nodes per model everything is evaluated, and the deadline
policy is exact: it never misses a candidate whose prediction fits.

Every policy only picks live nodes that serve the model and have credit (outstanding <
the capacity they report), so a node is never sent more than it said it can hold.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from cloud_broker.fleet import Fleet, Group, ModelIndex, NodeView, load_ratio
from skyhop.errors import ErrorCode

POLICIES = ("deadline", "round-robin", "least-connection", "weighted", "power-of-two")
EDGE, CLOUD = "edge", "cloud"
ORDER_TTL_MS = 1000.0  # how long a model's group cost order is reused


@dataclass(frozen=True)
class Ask:
    """What placement needs to know about one request."""

    model: str
    size: int  # sealed body bytes
    remaining_ms: float  # budget left now
    priority: int = 0
    exclude: frozenset[str] = frozenset()  # nodes that already failed this request
    origin: str = ""  # the stream it belongs to (client, site): hysteresis is per stream


@dataclass(frozen=True)
class Tuning:
    """Knobs of the deadline policy. The defaults are what docs/performance.md measured."""

    sample: int = 3  # members sampled from a large group
    exhaustive: int = 8  # a group up to this size is evaluated whole
    exhaustive_model: int = 32  # a model served by up to this many nodes: everything is
    # Service is costed at mean + tail × (p95 − mean): 1 is the p95; 2 is about the p99.5
    # of a normal or a mildly skewed (lognormal, cv ≤ 0.3) service time.
    tail: float = 2.0
    hysteresis: float = 0.15  # a cloud stream returns to the edge with this share to spare
    dwell_ms: float = 3_000.0  # ... and not before it has been on the cloud this long
    high_priority: int = 4  # from this priority on: earliest finish, not cheapest
    # Trunk reservation: below ``high_priority``, a request may not take a group's last
    # ``reserve`` share of idle nodes (a group under 1 / reserve nodes reserves none).
    reserve: float = 0.15
    max_streams: int = 10_000  # streams remembered for hysteresis; the oldest is forgotten


DEFAULT_TUNING = Tuning()


@dataclass(frozen=True)
class Decision:
    node: str | None
    predicted_ms: float = 0.0
    code: ErrorCode | None = None
    reason: str = ""
    where: str = ""  # role of the chosen node: "edge" | "cloud" | ""
    cloud_wanted: bool = False  # the edge could not make it: demand for the cloud pool
    pulled_back: bool = False  # meant for the cloud, run at an edge instead
    service_ms: float = 0.0  # expected (mean) service there: pass to Fleet.dispatched

    @property
    def placed(self) -> bool:
        return self.node is not None


@dataclass
class PlacementState:
    """What policies remember between calls: round-robin cursors and stream modes."""

    cursor: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    # stream -> (EDGE | CLOUD, since when); a stream not here is on the edge
    streams: dict[tuple[str, str], tuple[str, float]] = field(default_factory=dict)

    def mode(self, key: tuple[str, str]) -> tuple[str, float]:
        return self.streams.get(key, (EDGE, float("-inf")))

    def set_mode(self, key: tuple[str, str], mode: str, now_ms: float, limit: int) -> None:
        if self.mode(key)[0] == mode:
            return
        self.streams.pop(key, None)
        self.streams[key] = (mode, now_ms)  # re-inserted: the order is least recent first
        while len(self.streams) > limit:
            del self.streams[next(iter(self.streams))]


def predict_ms(view: NodeView, ask: Ask, now_ms: float | None = None,
               tuning: Tuning = DEFAULT_TUNING) -> float:
    """Predicted completion of ``ask`` on ``view``, from dispatch to reply received.

    With ``now_ms`` the queue wait counts only work the node runs first (it is
    earliest-deadline-first); without it, everything ahead.
    """
    deadline = None if now_ms is None else now_ms + ask.remaining_ms
    return _predict(view, ask.model, ask.size, deadline, tuning.tail)


def _predict(view: NodeView, model: str, size: int, deadline: float | None,
             tail: float, quiet_ms: float = 0.0) -> float:
    # The one formula: wait for a slot + high-quantile service + round trip + transfer,
    # and, for a node gone quiet, as long again as it has been (Fleet.quiet_ms).
    return view.wait_ms(model, deadline) + _alone(view, model, size, tail) + quiet_ms


def _alone(view: NodeView, model: str, size: int, tail: float) -> float:
    """The prediction on ``view`` were it idle: service + round trip + transfer."""
    return _service(view, model, tail) + view.link.predict_ms(size)


def _service(view: NodeView, model: str, tail: float) -> float:
    mean, p95 = view.service_ms(model)
    return mean + tail * (p95 - mean)


def place(fleet: Fleet, ask: Ask, now_ms: float, rng: random.Random, *,
          policy: str = "deadline", margin: float = 0.9,
          state: PlacementState | None = None, tuning: Tuning = DEFAULT_TUNING) -> Decision:
    """Decide where ``ask`` runs. ``state`` carries cursors and hysteresis between calls:
    pass the same object every time (a fresh one forgets both)."""
    idx = fleet.index(ask.model)
    if idx is None or not idx.all:
        return _nowhere(fleet, ask)
    state = state if state is not None else PlacementState()
    if policy == "deadline":
        return _deadline(_Scan(fleet, idx, ask, now_ms, rng, tuning), margin, state)
    chooser = _CHOOSERS.get(policy)
    if chooser is None:
        raise ValueError(f"unknown policy {policy!r}; choose one of {POLICIES}")
    seen = _Seen()
    view = chooser(fleet, idx, ask, rng, state, _usable(fleet, ask, now_ms, seen))
    if view is None:
        return _refusal(ask, seen)
    return Decision(view.node, predict_ms(view, ask, now_ms, tuning), where=view.role,
                    cloud_wanted=view.role == CLOUD, service_ms=view.service_ms(ask.model)[0])


def fits_anywhere(fleet: Fleet, ask: Ask, now_ms: float, margin: float = 0.9,
                  tuning: Tuning = DEFAULT_TUNING) -> bool:
    """Would any live node with credit in this view meet ``ask`` now, by the deadline
    policy's own prediction? The exhaustive question a refusal must answer no to: the
    simulator asks it of every refusal. O(nodes serving the model), and it changes
    nothing: for audits and tests, never per request."""
    idx = fleet.index(ask.model)
    if idx is None:
        return False
    limit, deadline = margin * ask.remaining_ms, now_ms + ask.remaining_ms
    return any(view.node not in ask.exclude and fleet.is_live(view, now_ms)
               and view.has_credit()
               and _predict(view, ask.model, ask.size, deadline, tuning.tail,
                            fleet.quiet_ms(view, now_ms)) <= limit
               for view in idx.all)


def _nowhere(fleet: Fleet, ask: Ask) -> Decision:
    if ask.model not in fleet.known_models:
        return Decision(None, code=ErrorCode.UNKNOWN_MODEL,
                        reason=f"no node has ever offered model {ask.model!r}")
    return Decision(None, code=ErrorCode.UNAVAILABLE,
                    reason=f"no live node serves {ask.model!r} right now")


@dataclass
class _Seen:
    """What the candidates looked at had in common: picks the refusal's error code."""

    live: int = 0
    credit: int = 0
    reserved: int = 0  # passed over: idle capacity kept for higher priorities
    quiet: int = 0  # silent past their report gaps (NodeView.quiet_ms)
    fastest_ms: float = float("inf")
    # The best any candidate or group could do idle: within the budget, a refusal is
    # load (OVERLOADED), not a budget nothing can meet (INFEASIBLE).
    alone_ms: float = float("inf")


def _refusal(ask: Ask, seen: _Seen, limit: float | None = None,
             cloud_wanted: bool = False) -> Decision:
    """Why nothing was placed. ``INFEASIBLE`` only when no node could meet the budget
    even idle; a budget an idle node meets is refused for load (``OVERLOADED``)."""
    inf = float("inf")
    if seen.live == 0 and seen.alone_ms == inf:
        return Decision(None, code=ErrorCode.UNAVAILABLE,
                        reason=f"no live node serves {ask.model!r} right now")
    if limit is not None and seen.alone_ms > limit:
        shown = f"{seen.alone_ms:.1f} ms" if seen.alone_ms < inf else "none in reach"
        return Decision(None, seen.alone_ms if seen.alone_ms < inf else 0.0,
                        ErrorCode.INFEASIBLE, f"best predicted {shown} > {limit:.1f} ms "
                        f"(of {ask.remaining_ms:.1f} ms left), even on an idle node",
                        cloud_wanted=cloud_wanted)
    if seen.credit == 0 and seen.reserved:
        return Decision(None, code=ErrorCode.OVERLOADED, cloud_wanted=cloud_wanted,
                        reason=f"the free capacity for {ask.model!r} is reserved for "
                               f"higher priorities than {ask.priority}")
    if seen.credit == 0 or limit is None:
        return Decision(None, code=ErrorCode.OVERLOADED, cloud_wanted=cloud_wanted,
                        reason=f"all {seen.live} nodes tried for {ask.model!r} are full")
    fastest = seen.fastest_ms
    kept = f"; {seen.reserved} idle kept for higher priorities" if seen.reserved else ""
    kept += f"; {seen.quiet} gone quiet (no report for 3 intervals)" if seen.quiet else ""
    return Decision(None, fastest, ErrorCode.OVERLOADED,
                    f"best predicted {fastest:.1f} ms > {limit:.1f} ms (of "
                    f"{ask.remaining_ms:.1f} ms left) under the current load; "
                    f"{seen.alone_ms:.1f} ms when idle{kept}", cloud_wanted=cloud_wanted)


def _usable(fleet: Fleet, ask: Ask, now_ms: float, seen: _Seen) -> Callable[[NodeView], bool]:
    def ok(view: NodeView) -> bool:
        if view.node in ask.exclude or not fleet.is_live(view, now_ms):
            return False
        seen.live += 1
        if not view.has_credit():
            return False
        seen.credit += 1
        return True

    return ok


# -- deadline -----------------------------------------------------------------------------


@dataclass
class _Pick:
    """The best candidate under one limit: cheapest group first, then earliest finish."""

    limit: float
    view: NodeView | None = None
    predicted: float = 0.0
    rank: int = 0  # position of its group in cost order


class _Scan:
    """One request's view of the candidates, evaluated lazily group by group."""

    def __init__(self, fleet: Fleet, idx: ModelIndex, ask: Ask, now_ms: float,
                 rng: random.Random, tuning: Tuning) -> None:
        self.fleet, self.idx, self.ask, self.now, self.rng = fleet, idx, ask, now_ms, rng
        self.tuning = tuning
        self.small = len(idx.all) <= tuning.exhaustive_model
        self.seen = _Seen()
        self.deadline = now_ms + ask.remaining_ms
        self.low = ask.priority < tuning.high_priority

    def groups(self, role: str) -> list[Group]:
        """The role's groups, cheapest first: the slowest GPU class for this model.

        Class priors move slowly, so the order is kept for ``ORDER_TTL_MS``, or until
        a group is added.
        """
        cached = self.idx.order.get(role)
        if cached is not None and 0 <= self.now - cached[0] < ORDER_TTL_MS \
                and cached[1] == len(self.idx.groups):
            return cached[2]
        priors, model = self.fleet.priors, self.ask.model
        mine = [g for g in self.idx.groups.values() if g.role == role]
        mine.sort(key=lambda g: (-priors.get(g.gpu, model)[0], g.gpu))
        self.idx.order[role] = (self.now, len(self.idx.groups), mine)
        return mine

    def best_case(self, g: Group) -> float:
        """A lower bound on any member's prediction (class prior, best link seen)."""
        p95 = self.fleet.priors.get(g.gpu, self.ask.model)[1]
        return p95 + g.min_rtt_ms + self.ask.size * g.min_ms_per_byte

    def alone_case(self, g: Group) -> float:
        """What a member with the class prior and the group's best link predicts idle."""
        mean, p95 = self.fleet.priors.get(g.gpu, self.ask.model)
        return (mean + self.tuning.tail * (p95 - mean) + g.min_rtt_ms
                + self.ask.size * g.min_ms_per_byte)

    def members(self, g: Group) -> list[NodeView]:
        """The candidates of a group: all of a small one; else a sample that looks at
        idle members first (where they may be used), then at any."""
        items = g.members.items
        n = len(items)
        if self.small or n <= self.tuning.exhaustive:
            return items
        rand, free = self.rng.random, g.free.items
        k = self.tuning.sample
        picks = [items[int(rand() * n)]]
        if free and not (self.low and self.reserved(g)):
            picks += [free[int(rand() * len(free))] for _ in range(k - 1)]
        else:
            picks += [items[int(rand() * n)] for _ in range(k - 1)]
        return picks

    def reserved(self, g: Group) -> bool:
        """Are the group's idle nodes down to those kept for higher priorities?"""
        return len(g.free) <= int(self.tuning.reserve * len(g.members))

    def pick(self, role: str, picks: list[_Pick], greedy: bool) -> None:
        """Fill ``picks`` (limits in decreasing order) from the role's groups.

        Not greedy: stop at the first group with a fit under every limit (the
        cheapest). Greedy: look at every group, keep the earliest finish.
        """
        loose = picks[0].limit
        for rank, g in enumerate(self.groups(role)):
            if not g.members:
                continue
            if not self.small and len(g.members) > self.tuning.exhaustive:
                self.seen.alone_ms = min(self.seen.alone_ms, self.alone_case(g))
                if self.best_case(g) > loose:
                    continue
            for view in self.members(g):
                predicted = self.evaluate(view, g)
                if predicted is not None:
                    for p in picks:
                        _offer(p, view, predicted, rank, greedy)
            if not greedy and all(p.view is not None for p in picks):
                return

    def evaluate(self, view: NodeView, g: Group) -> float | None:
        """The prediction on ``view``, or None when it cannot take the request at all."""
        if view.node in self.ask.exclude or not view.status.online \
                or self.now - view.last_seen_ms > self.fleet.node_timeout_ms:
            return None
        seen, ask = self.seen, self.ask
        seen.live += 1
        service = _service(view, ask.model, self.tuning.tail)
        alone = service + view.link.predict_ms(ask.size)
        # A refusal's code is judged over the best link seen (Link.idle_ms): INFEASIBLE
        # only when even an idle fleet would miss the budget.
        seen.alone_ms = min(seen.alone_ms, service + view.link.idle_ms(ask.size))
        if view.outstanding >= view.capacity:
            return None
        if self.low and view.idle and self.reserved(g):
            seen.reserved += 1  # the last idle nodes are kept for higher priorities
            return None
        seen.credit += 1
        quiet = self.fleet.quiet_ms(view, self.now)
        seen.quiet += quiet > 0
        predicted = view.wait_ms(ask.model, self.deadline) + alone + quiet
        if predicted < seen.fastest_ms:
            seen.fastest_ms = predicted
        return predicted

    def cloud_in_reach(self, limit: float) -> bool:
        """Could a cloud worker, idle, make it? (Also when none is up: scale-to-zero.)"""
        return any(g.role == CLOUD and self.best_case(g) <= limit
                   for g in self.idx.groups.values())


def _offer(p: _Pick, view: NodeView, predicted: float, rank: int, greedy: bool) -> None:
    if predicted > p.limit:
        return
    if p.view is None or (not greedy and rank > p.rank):
        better = p.view is None
    else:
        better = (predicted, view.node) < (p.predicted, p.view.node)
    if better:
        p.view, p.predicted, p.rank = view, predicted, rank


def _deadline(scan: _Scan, margin: float, state: PlacementState) -> Decision:
    ask, tuning, now = scan.ask, scan.tuning, scan.now
    limit = margin * ask.remaining_ms
    key = (ask.model, ask.origin)
    mode, since = state.mode(key)
    greedy = ask.priority >= tuning.high_priority
    # Hysteresis: a stream on the cloud comes back only after ``dwell_ms`` there, and to
    # an edge with slack to spare; until then the edge is only its fallback (pull-back).
    settled = mode == CLOUD and now - since < tuning.dwell_ms
    edge = [_Pick(limit), _Pick(limit * (1 - tuning.hysteresis))] if mode == CLOUD \
        else [_Pick(limit)]
    if not settled:
        scan.pick(EDGE, edge, greedy)
        back = edge[-1]
        if back.view is not None:
            state.set_mode(key, EDGE, now, tuning.max_streams)
            return _placed(back, ask, EDGE)
    cloud = [_Pick(limit)]
    scan.pick(CLOUD, cloud, greedy)
    if cloud[0].view is not None:
        state.set_mode(key, CLOUD, now, tuning.max_streams)
        return _placed(cloud[0], ask, CLOUD, cloud_wanted=True)
    wanted = scan.cloud_in_reach(limit)
    if settled:
        scan.pick(EDGE, edge[:1], greedy)
    if edge[0].view is not None:  # pull-back: the cloud cannot make it now, an edge can
        return _placed(edge[0], ask, EDGE, cloud_wanted=wanted, pulled_back=True)
    return _refusal(ask, scan.seen, limit, wanted)


def _placed(pick: _Pick, ask: Ask, where: str, cloud_wanted: bool = False,
            pulled_back: bool = False) -> Decision:
    assert pick.view is not None
    return Decision(pick.view.node, pick.predicted, where=where, cloud_wanted=cloud_wanted,
                    pulled_back=pulled_back, service_ms=pick.view.service_ms(ask.model)[0])


# -- baselines ----------------------------------------------------------------------------

Usable = Callable[[NodeView], bool]
Chooser = Callable[[Fleet, ModelIndex, Ask, random.Random, PlacementState, Usable],
                   NodeView | None]
TRIES = 16  # candidates a baseline looks at before it calls the fleet full


def _round_robin(fleet: Fleet, idx: ModelIndex, ask: Ask, rng: random.Random,
                 state: PlacementState, usable: Usable) -> NodeView | None:
    items = idx.all.items
    for _ in range(min(TRIES, len(items))):
        view = items[state.cursor[ask.model] % len(items)]
        state.cursor[ask.model] += 1
        if usable(view):
            return view
    return None


def _least_connection(fleet: Fleet, idx: ModelIndex, ask: Ask, rng: random.Random,
                      state: PlacementState, usable: Usable) -> NodeView | None:
    return fleet.least_loaded(ask.model, usable)


def _weighted(fleet: Fleet, idx: ModelIndex, ask: Ask, rng: random.Random,
              state: PlacementState, usable: Usable) -> NodeView | None:
    # Weight = declared capability × parallel slots; a group's weight is its members'.
    groups = [g for g in idx.groups.values() if g.members]
    weights = [fleet.gpu_speed.get(g.gpu, 1.0) * len(g.members) for g in groups]
    for _ in range(TRIES):
        members = rng.choices(groups, weights=weights)[0].members.items
        view = members[int(rng.random() * len(members))]
        if usable(view):
            return view
    return None


def _power_of_two(fleet: Fleet, idx: ModelIndex, ask: Ask, rng: random.Random,
                  state: PlacementState, usable: Usable) -> NodeView | None:
    items, found = idx.all.items, []
    for _ in range(TRIES):
        view = items[int(rng.random() * len(items))]
        if usable(view):
            found.append(view)
            if len(found) == 2:
                break
    if not found:
        return None
    return min(found, key=load_ratio)


_CHOOSERS: dict[str, Chooser] = {
    "round-robin": _round_robin,
    "least-connection": _least_connection,
    "weighted": _weighted,
    "power-of-two": _power_of_two,
}
