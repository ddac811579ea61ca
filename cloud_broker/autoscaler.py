"""How many cloud GPUs the pool should have: ``scale(ctx, state) -> (target, state)``. Pure.

Call it every ``ScaleConfig.interval_ms`` with what happened since the last call (a
``ScaleContext``: per-model demand, the pool's size, cold starts observed) and the
state it returned last time (``None`` the first time); start or stop workers to reach
the returned target. No clock, no I/O: the simulator and a live pool backend call the
same function.

Policies (``ScaleConfig.policy``):

- ``predictive`` (default): forecast each model's cloud demand with Holt's linear
  (trend-aware) smoothing, damped, ``lead`` = the measured cold start + one interval
  ahead; the expected rise in *all* of a model's requests counts as cloud demand too
  (``early_warning``), because the edges absorb a crowd's start and overflow later, at
  once. Size the pool with an M/M/c
  (Erlang C) model so that the SLO quantile of requests waits less than the budget's
  slack (margin × budget − p95 service − network) behind the work due before it (the
  workers' queues are earliest-deadline-first), with ``headroom``; scale up at
  once; scale down, by more than the hysteresis band, to the highest need of the last
  hold (``downscale_delay_ms``; two leads once released workers were needed again
  soon, or a model's requests jumped again soon: see ``_settle``), and not while
  requests are forecast to rise. Min/max
  size, a cost cap, optional scale-to-zero after ``idle_to_zero_ms`` without demand.
- ``reactive``: Ray Serve-like target utilisation — desired = offered load ÷ (slots ×
  ``target_utilization``), averaged over a 30 s look-back; scale only after the wish
  persisted ``upscale_delay_ms`` (30 s) up or ``reactive_downscale_delay_ms`` (600 s)
  down.
- ``static-peak``: a fixed pool of ``static_size`` (sized for the scenario's peak).

Demand is *cloud demand*: requests the placement sent to the cloud, pulled back to an
edge, or refused while the cloud could have made it (``Decision.cloud_wanted``). A pool
sized for the requests it happened to receive would never grow past its own size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

AUTOSCALERS = ("predictive", "reactive", "static-peak")


@dataclass(frozen=True)
class ModelDemand:
    """One model's demand over the last interval, and what serving it on the cloud costs."""

    model: str
    cloud_requests: int  # requests that wanted the cloud (Decision.cloud_wanted)
    requests: int = 0  # all requests of the model (their trend is the early warning)
    service_ms: float = 0.0  # mean service on a cloud worker (measured; 0: never measured)
    p95_ms: float = 0.0
    budget_ms: float = 1000.0  # the model's SLA budget
    network_ms: float = 0.0  # round trip + transfer to a cloud worker


@dataclass(frozen=True)
class PoolView:
    ready: int  # workers serving
    starting: int  # workers booting (paid for, not serving)
    slots: int = 1  # requests a worker runs in parallel
    ongoing: int = 0  # requests running or queued on ready workers now
    cold_starts_ms: tuple[float, ...] = ()  # start-to-ready times observed since last call

    @property
    def size(self) -> int:
        return self.ready + self.starting


@dataclass(frozen=True)
class ScaleConfig:
    policy: str = "predictive"
    interval_ms: float = 5_000.0
    min_size: int = 1
    max_size: int = 100
    scale_to_zero: bool = False  # allow 0 workers after ``idle_to_zero_ms`` without demand
    idle_to_zero_ms: float = 300_000.0
    price_per_gpu_hour: float = 1.0
    cost_cap_per_hour: float | None = None  # most the pool may cost per hour
    slo_quantile: float = 0.99
    margin: float = 0.9  # the placement's margin: plan to finish in margin × budget
    cold_start_prior_ms: float = 60_000.0  # until a cold start is measured
    # predictive
    alpha: float = 0.5  # level smoothing
    beta: float = 0.3  # trend smoothing
    damping: float = 0.95  # trend damping per interval (a slope counts ~20 intervals at most)
    # Share of the expected rise in *all* of a model's requests counted as cloud demand:
    # 1 holds the SLO through a ramp whatever the cold start; less saves GPU-seconds and
    # loses SLO when bursts or cold starts are long (docs/performance.md, Sensitivity).
    early_warning: float = 1.0
    headroom: float = 1.1  # forecast error and burstiness the queueing model ignores
    # A worker is released once the need has stayed below it for the hold:
    # ``downscale_delay_ms``, or ``max_hold_leads`` leads (the measured cold start + one
    # interval: how long a re-bought worker takes) if longer, for ``hold_memory_ms``
    # after a regret — released workers needed again within that many leads (0: never).
    # docs/adr/0004-scale-down-hold.md says why.
    downscale_delay_ms: float = 30_000.0
    max_hold_leads: float = 2.0
    hold_memory_ms: float = 600_000.0
    hysteresis: float = 0.1  # scale down only when the need is this share below target
    # reactive (Ray Serve defaults where it has them)
    target_utilization: float = 0.7
    look_back_ms: float = 30_000.0
    upscale_delay_ms: float = 30_000.0
    reactive_downscale_delay_ms: float = 600_000.0
    # static-peak
    static_size: int = 0

    def __post_init__(self) -> None:
        if self.policy not in AUTOSCALERS:
            raise ValueError(f"unknown autoscaler {self.policy!r}; choose one of {AUTOSCALERS}")
        if not 0 <= self.min_size <= self.max_size:
            raise ValueError(f"need 0 <= min_size <= max_size, got {self.min_size}, "
                             f"{self.max_size}")


@dataclass(frozen=True)
class ScaleContext:
    now_ms: float
    models: tuple[ModelDemand, ...]
    pool: PoolView
    config: ScaleConfig = ScaleConfig()


@dataclass(frozen=True)
class Holt:
    """Level and trend (requests per second, per second) of one model's demand."""

    level: float
    trend: float = 0.0

    def update(self, rate: float, dt_s: float, alpha: float, beta: float) -> Holt:
        guess = self.level + self.trend * dt_s
        level = alpha * rate + (1 - alpha) * guess
        trend = beta * (level - self.level) / dt_s + (1 - beta) * self.trend
        return Holt(level, trend)

    def rise(self, ahead_s: float, step_s: float, damping: float) -> float:
        """How much higher the rate is expected ``ahead_s`` from now (never negative).

        The trend is damped (Gardner & McKenzie): step k adds ``damping**k`` of it, so a
        burst's slope is not extrapolated for a whole cold start. A fall is not
        extrapolated at all: scaling down early costs SLOs, late only money.
        """
        if self.trend <= 0:
            return 0.0
        steps = ahead_s / step_s
        damped = damping * (1 - damping ** steps) / (1 - damping) if damping < 1 else steps
        return self.trend * step_s * damped

    def forecast(self, ahead_s: float, step_s: float, damping: float) -> float:
        return max(0.0, self.level) + self.rise(ahead_s, step_s, damping)


@dataclass(frozen=True)
class ScaleState:
    target: int
    cold_start_ms: float
    cold_starts_seen: int = 0
    demand: dict[str, Holt] = field(default_factory=dict)  # cloud demand; never mutated
    arrivals: dict[str, Holt] = field(default_factory=dict)  # all requests; never mutated
    needs: tuple[tuple[float, int], ...] = ()  # predictive: (time, need), oldest first
    released: tuple[tuple[float, int], ...] = ()  # (unneeded since, level kept) per release
    regrets: tuple[tuple[float, float], ...] = ()  # (when, idle gap ms): released, needed again
    rates: dict[str, float] = field(default_factory=dict)  # model -> requests/s last interval
    bursts: dict[str, float] = field(default_factory=dict)  # model -> its requests' last jump
    below_since_ms: float | None = None  # reactive: when the wish to shrink began
    above_since_ms: float | None = None  # reactive: when the wish to grow began
    history: tuple[tuple[float, float], ...] = ()  # reactive look-back: (time, slots)
    idle_since_ms: float | None = None
    last_ms: float | None = None


def initial_state(config: ScaleConfig, size: int) -> ScaleState:
    """The state to start from when the pool has ``size`` workers."""
    return ScaleState(target=size, cold_start_ms=config.cold_start_prior_ms)


def scale(ctx: ScaleContext, state: ScaleState | None = None) -> tuple[int, ScaleState]:
    """The pool size to aim for now, and the state to pass next time."""
    cfg = ctx.config
    state = state or initial_state(cfg, ctx.pool.size)
    state = _learn_cold_start(state, ctx.pool.cold_starts_ms)
    if cfg.policy == "static-peak":
        target = _bounds(cfg.static_size, cfg, allow_zero=cfg.static_size == 0)
        return target, replace(state, target=target, last_ms=ctx.now_ms)
    if cfg.policy == "reactive":
        return _reactive(ctx, state)
    return _predictive(ctx, state)


def _learn_cold_start(state: ScaleState, observed: tuple[float, ...]) -> ScaleState:
    estimate, measured = state.cold_start_ms, state.cold_starts_seen
    for ms in observed:  # EWMA: a pool's cold start drifts with image and node caches
        estimate = ms if measured == 0 else estimate + 0.3 * (ms - estimate)
        measured += 1  # the prior is a placeholder, not a measurement: the first replaces it
    return replace(state, cold_start_ms=estimate, cold_starts_seen=measured)


def _interval_s(ctx: ScaleContext, state: ScaleState) -> float:
    """Seconds the counts in ``ctx`` cover: since the last call, else one interval."""
    if state.last_ms is None or ctx.now_ms - state.last_ms < 0.1 * ctx.config.interval_ms:
        return ctx.config.interval_ms / 1000
    return (ctx.now_ms - state.last_ms) / 1000


# -- predictive ----------------------------------------------------------------------------


def _predictive(ctx: ScaleContext, state: ScaleState) -> tuple[int, ScaleState]:
    cfg, dt = ctx.config, _interval_s(ctx, state)
    demand = _smooth(state.demand, {m.model: m.cloud_requests / dt for m in ctx.models}, dt, cfg)
    requests = {m.model: m.requests / dt for m in ctx.models}
    arrivals = _smooth(state.arrivals, requests, dt, cfg)
    ahead_s = _lead_ms(state, cfg) / 1000
    step_s = cfg.interval_ms / 1000
    rises = _rises(arrivals, state, cfg)

    # The cloud sees a crowd last: the edges absorb its start and then overflow at once.
    # So the rise expected in *all* requests by the time a worker started now is up is
    # counted as cloud demand too (``early_warning`` of it). Crediting the edges' idle
    # capacity against it was tried: it saved money and lost SLO on bursty load.
    def rate(m: ModelDemand) -> float:
        cloud = demand[m.model]
        rise = cfg.early_warning * rises[m.model]
        return max(cloud.forecast(ahead_s, step_s, cfg.damping), max(0.0, cloud.level) + rise)

    rates = {m.model: rate(m) for m in ctx.models}
    need = workers_needed(ctx.models, rates, ctx.pool.slots, cfg)
    idle_since = _idle_since(state, ctx.now_ms, sum(rates.values()) > 1e-9)
    allow_zero = cfg.scale_to_zero and idle_since is not None \
        and ctx.now_ms - idle_since >= cfg.idle_to_zero_ms
    need = _bounds(need, cfg, allow_zero)
    state = _recurring_bursts(ctx, state, dt, _longest_hold(state, cfg))
    state = replace(state, demand=demand, arrivals=arrivals, idle_since_ms=idle_since,
                    last_ms=ctx.now_ms, rates=requests)
    rising = any(rises[m] > cfg.hysteresis * max(0.0, h.level) for m, h in arrivals.items())
    return _settle(need, state, ctx.now_ms, cfg, rising)


def _rises(arrivals: dict[str, Holt], state: ScaleState, cfg: ScaleConfig) -> dict[str, float]:
    """Per model, how much higher its requests/s are expected a lead from now."""
    ahead_s = _lead_ms(state, cfg) / 1000
    return {m: h.rise(ahead_s, cfg.interval_ms / 1000, cfg.damping) for m, h in arrivals.items()}


def early_warning_rate(state: ScaleState, cfg: ScaleConfig) -> float:
    """Requests/s the early warning counted as cloud demand at the last call, all models
    together: what a scale-up bought ahead of the spill (the broker logs it)."""
    return cfg.early_warning * sum(_rises(state.arrivals, state, cfg).values())


def _recurring_bursts(ctx: ScaleContext, state: ScaleState, dt: float,
                      longest: float) -> ScaleState:
    """Requests of a model that jump again within ``longest`` of their last jump are a
    regret the pool did not have to pay for: had it released its workers in between, it
    would have wanted them back (``_settle``). A crowd jumps once; MMPP bursts recur."""
    bursts, regrets = dict(state.bursts), state.regrets
    for m in ctx.models:
        before = state.rates.get(m.model)
        if before is None or not _jumped(m.requests, before * dt):
            continue
        last = bursts.get(m.model)
        if last is not None and ctx.now_ms - last < longest:
            regrets += ((ctx.now_ms, ctx.now_ms - last),)
        bursts[m.model] = ctx.now_ms
    return replace(state, bursts=bursts, regrets=regrets)


def _jumped(count: float, expected: float) -> bool:
    """More than twice the interval before, and beyond a Poisson count's noise (5 σ):
    a burst's step, not a ramp (``flash-crowd``'s two-minute ramp climbs
    ×1.3 in its first interval, less after)."""
    return count > 2 * expected and count - expected > 5 * math.sqrt(max(expected, 1.0))


def _smooth(prev: dict[str, Holt], rates: dict[str, float], dt: float,
            cfg: ScaleConfig) -> dict[str, Holt]:
    out = {}
    for model, rate in rates.items():
        h = prev.get(model)
        out[model] = Holt(rate) if h is None else h.update(rate, dt, cfg.alpha, cfg.beta)
    return out


def _idle_since(state: ScaleState, now_ms: float, busy: bool) -> float | None:
    if busy:
        return None
    return state.idle_since_ms if state.idle_since_ms is not None else now_ms


def _settle(need: int, state: ScaleState, now_ms: float, cfg: ScaleConfig,
            rising: bool) -> tuple[int, ScaleState]:
    """Up at once; down to the highest need of the last hold, once clearly below target.

    Each idle worker is a ski rental: keep paying for it, or release it and pay a boot
    (and the misses while it boots) if it is needed again. So a worker goes once the
    need has stayed below it for the hold (a sliding window, as in Kubernetes' HPA):
    ``downscale_delay_ms``, or after a regret — released workers needed again within
    ``max_hold_leads`` leads, or requests that jumped again that soon
    (``_recurring_bursts``) — that longer hold, for ``hold_memory_ms``:
    bursts that recur keep their pool between them, a crowd that leaves is let go. And
    nothing goes while requests are forecast to rise: a ramp's dips are not its end.
    """
    longest = _longest_hold(state, cfg)
    regrets, released = _regrets(need, state, now_ms, longest, cfg)
    hold = _hold(regrets, longest, cfg)
    history = state.needs or ((now_ms, state.target),)  # the pool one starts with counts
    needs = tuple((t, n) for t, n in history if now_ms - t < max(hold, longest))
    needs += ((now_ms, need),)
    keep = max(n for t, n in needs if now_ms - t <= hold)
    target = state.target
    if need >= target:
        target = need
    elif not rising and target - keep >= max(1.0, cfg.hysteresis * target):
        released += ((now_ms - hold, keep),)  # unneeded above ``keep`` since then at least
        target = keep
    return target, replace(state, target=target, needs=needs, released=released,
                           regrets=regrets)


def hold_ms(state: ScaleState, cfg: ScaleConfig) -> float:
    """How long the need must stay below a worker before it goes (``_settle``)."""
    return _hold(state.regrets, _longest_hold(state, cfg), cfg)


def _hold(regrets: tuple[tuple[float, float], ...], longest: float,
          cfg: ScaleConfig) -> float:
    bursty = any(gap < longest for _, gap in regrets)  # judged by today's cold start
    return max(cfg.downscale_delay_ms, longest) if bursty else cfg.downscale_delay_ms


def _lead_ms(state: ScaleState, cfg: ScaleConfig) -> float:
    """How long until a worker asked for now serves: the measured cold start, plus up to
    one interval before the next call notices the need."""
    return state.cold_start_ms + cfg.interval_ms


def _longest_hold(state: ScaleState, cfg: ScaleConfig) -> float:
    """Holding an idle worker pays while that is shorter than re-buying it."""
    return cfg.max_hold_leads * _lead_ms(state, cfg)


def _regrets(need: int, state: ScaleState, now_ms: float, longest: float,
             cfg: ScaleConfig) -> tuple[tuple[tuple[float, float], ...],
                                        tuple[tuple[float, int], ...]]:
    """Releases the need climbed back over, out of the hysteresis band, within
    ``longest`` become regrets (when, idle gap); older releases are forgotten."""
    regrets = tuple(r for r in state.regrets if now_ms - r[0] < cfg.hold_memory_ms)
    released = []
    for since, level in state.released:
        if now_ms - since >= longest:
            continue  # a longer hold would have cost more than the boot it saves
        if need - level >= max(1.0, cfg.hysteresis * level):
            regrets += ((now_ms, now_ms - since),)
        else:
            released.append((since, level))
    return regrets, tuple(released)


def workers_needed(models: tuple[ModelDemand, ...], rates: dict[str, float], slots: int,
                   cfg: ScaleConfig) -> int:
    """Workers for ``rates`` (requests/s per model) to meet the SLO quantile, pooled.

    The models share workers, so they are one M/M/c queue with the rate-weighted mean
    service. The workers' queues are earliest-deadline-first, so a model waits only
    behind the work due before it: roughly, the models with budgets no longer than its
    own. Each model must meet its own slack against that work; the pool is the largest
    of those sizes.
    """
    total = sum(rates.get(m.model, 0.0) for m in models)
    if total <= 1e-9:
        return 0
    known = [m for m in models if rates.get(m.model, 0.0) > 0 and m.service_ms > 0]
    if not known:
        return 1  # demand for a model never measured on the cloud: one worker learns it
    known_rate = sum(rates[m.model] for m in known)
    lam = known_rate * cfg.headroom
    mean_s = sum(rates[m.model] * m.service_ms for m in known) / known_rate / 1000
    servers = 0
    for m in known:
        slack_s = max(0.0, cfg.margin * m.budget_ms - m.p95_ms - m.network_ms) / 1000
        ahead = sum(rates[k.model] for k in known if k.budget_ms <= m.budget_ms) * cfg.headroom
        servers = max(servers, servers_needed(lam, mean_s, slack_s, cfg.slo_quantile,
                                              ahead_rate=ahead))
    return math.ceil(servers / slots)


def servers_needed(rate: float, service_s: float, wait_s: float, quantile: float,
                   limit: int = 100_000, ahead_rate: float | None = None) -> int:
    """Fewest M/M/c servers with P(wait > ``wait_s``) <= 1 − ``quantile``.

    P(W > t) = C(c, a)·exp(−(c·μ − λ')·t), with Erlang C from the Erlang B recursion;
    λ' is the rate of the work served before the request (``ahead_rate``; all of it,
    ``rate``, in first-come-first-served order): once all servers are busy, the queue
    ahead of it drains at c·μ less what keeps joining in front.
    """
    a = rate * service_s
    if a <= 0:
        return 0
    mu = 1 / service_s
    ahead = rate if ahead_rate is None else ahead_rate
    c = max(1, math.floor(a) + 1)
    b = _erlang_b(c, a)
    while c < limit:
        erlang_c = c * b / (c - a * (1 - b))
        if erlang_c * math.exp(-(c * mu - ahead) * wait_s) <= 1 - quantile:
            return c
        c += 1
        b = a * b / (c + a * b)
    return limit


def _erlang_b(c: int, a: float) -> float:
    b = 1.0
    for k in range(1, c + 1):
        b = a * b / (k + a * b)
    return b


def _bounds(n: int, cfg: ScaleConfig, allow_zero: bool = False) -> int:
    cap = cfg.max_size
    if cfg.cost_cap_per_hour is not None and cfg.price_per_gpu_hour > 0:
        cap = min(cap, int(cfg.cost_cap_per_hour // cfg.price_per_gpu_hour))
    floor = 0 if allow_zero else max(cfg.min_size, 0 if cfg.scale_to_zero else 1)
    return max(0, min(cap, max(n, floor)))


# -- reactive ------------------------------------------------------------------------------


def _reactive(ctx: ScaleContext, state: ScaleState) -> tuple[int, ScaleState]:
    cfg, dt, now = ctx.config, _interval_s(ctx, state), ctx.now_ms
    # Offered load in busy slots (Little's law), the quantity Ray Serve calls ongoing.
    offered = sum(m.cloud_requests / dt * m.service_ms / 1000 for m in ctx.models)
    history = tuple(h for h in state.history if now - h[0] < cfg.look_back_ms)
    history += ((now, offered),)
    mean = sum(v for _, v in history) / len(history)
    wish = _bounds(math.ceil(mean / (ctx.pool.slots * cfg.target_utilization) - 1e-9), cfg,
                   allow_zero=cfg.scale_to_zero)
    state = replace(state, history=history, last_ms=now)
    target = state.target
    if wish == target:
        return target, replace(state, above_since_ms=None, below_since_ms=None)
    grow = wish > target
    since = state.above_since_ms if grow else state.below_since_ms
    since = now if since is None else since
    delay = cfg.upscale_delay_ms if grow else cfg.reactive_downscale_delay_ms
    if now - since >= delay:
        return wish, replace(state, target=wish, above_since_ms=None, below_since_ms=None)
    if grow:
        return target, replace(state, above_since_ms=since, below_since_ms=None)
    return target, replace(state, above_since_ms=None, below_since_ms=since)
