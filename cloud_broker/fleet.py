"""The broker's view of the fleet, rebuilt from status and load messages. Pure.

A node is *live* when its latest status says online and it has reported within
``node_timeout_ms``. Telemetry is stale by up to one report interval, so the view also
counts what this broker has dispatched and not yet seen answered (``outstanding``):
that number is exact for work placed here, and the placement adds it to the queue
the node last reported.

Indexes, so that one placement costs the same at 100 nodes as at 100,000:

- per model, an ``IndexedSet`` of the online nodes that serve it (O(1) add, remove
  and uniform sample), split into *groups* by (role, GPU class): placement samples a
  few nodes per group instead of scanning the fleet;
- ``ClassPriors``: per (GPU class, model) service times learnt from every measured
  node of the class, the estimate for a node that has not run the model yet;
- a lazy expiry heap, so that finding silent nodes does not scan the fleet either;
- a lazy least-loaded heap per model, built on first use (the least-connection
  baseline is the only reader).
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from itertools import islice

from skyhop.batching import BatchPoint, amortised, batch_ms
from skyhop.protocol.messages import LoadReport, NodeStatus

DEFAULT_MS_PER_BYTE = 8 / 50_000  # 50 Mbit/s until a link is measured
RTT_ALPHA = 0.2
LARGE_BYTES = 16_384  # a payload this big teaches the per-byte cost, a smaller the round trip
TRUSTED_SAMPLES = 5  # fewer link samples than this may be one cold first request
PRIOR_AFTER = 10  # report intervals without work before an untrusted link is retried
# A node silent for more than this many of its report gaps is *quiet*: a cut link, a
# paused process or a dead one, until it reports again. The gap is learned per node,
# from this default (agents report every 0.5 s, the simulator's nodes every 1 s).
QUIET_GAPS = 3
DEFAULT_REPORT_GAP_MS = 1_000.0
PRIOR_ALPHA = 0.1  # class priors move slowly: one odd node must not reprice its class
MIN_SAMPLES = 20  # a node's own p95 is trusted from this many runs on; before, its class's
WARMUP_P95 = 1.5  # p95 ÷ mean assumed from a warm-up run alone (a cv ≈ 0.3 lognormal's)

# Declared relative capability per GPU class (desktop RTX 3060 class = 1.0). The
# ``weighted`` baseline weighs nodes by it, as users configure nginx/HAProxy weights.
# Unknown classes weigh 1.0; a Fleet may be given its own table.
GPU_SPEED: dict[str, float] = {
    "cpu": 0.05,
    "jetson-nano": 0.1,
    "jetson-orin-nano": 0.3,
    "jetson-orin-nx": 0.5,
    "jetson-agx-orin": 1.0,
    "desktop-rtx": 1.5,
    "nvidia-t4": 0.8,
    "nvidia-l4": 1.6,
    "nvidia-a10g": 1.8,
    "nvidia-a100": 3.5,
    "nvidia-h100": 6.0,
}


@dataclass
class Link:
    """Network cost to a node, learnt from completed requests.

    ``observed = (reply received - dispatched) - queue_ms - service_ms`` is pure network
    time on the broker's own clock, so no clock sync is needed. Small payloads teach
    the round trip, large ones the per-byte cost. The best values seen are kept too
    (slowly forgetting): ``relax()`` drifts back toward them while a node gets no work.
    """

    rtt_ms: float = 0.0
    ms_per_byte: float = DEFAULT_MS_PER_BYTE
    samples: int = 0
    large: int = 0  # of the samples, payloads of LARGE_BYTES or more
    idle: int = 0  # report intervals without work since the last sample
    best_rtt_ms: float = float("inf")
    best_ms_per_byte: float = float("inf")

    def predict_ms(self, size: int) -> float:
        return self.rtt_ms + size * self.ms_per_byte

    def idle_ms(self, size: int) -> float:
        """``predict_ms`` over the best values seen: a round trip learnt under load holds
        queueing in the MQTT server and the broker that an idle fleet would not have."""
        return (min(self.rtt_ms, self.best_rtt_ms)
                + size * min(self.ms_per_byte, self.best_ms_per_byte))

    def observe(self, network_ms: float, size: int) -> None:
        network_ms = max(0.0, network_ms)
        self.samples += 1
        self.large += size >= LARGE_BYTES
        self.idle = 0
        transfer = network_ms - self.rtt_ms
        if self.samples == 1:
            self.rtt_ms = network_ms
        elif size < LARGE_BYTES:
            self.rtt_ms += RTT_ALPHA * (network_ms - self.rtt_ms)
        elif transfer > 0:
            self.ms_per_byte += RTT_ALPHA * (transfer / size - self.ms_per_byte)
        self.best_rtt_ms = _low(self.best_rtt_ms, self.rtt_ms)
        self.best_ms_per_byte = _low(self.best_ms_per_byte, self.ms_per_byte)

    def relax(self, ping_rtt_ms: float) -> None:
        """The node got no work for a report interval: move toward the best seen.

        Estimates are learnt only from work sent, so a slow spell that priced a node out
        of every budget would otherwise exclude it for good (it is never measured again).
        Where the best seen rests on fewer than ``TRUSTED_SAMPLES`` (one cold first
        request, say) and the node has had no work for ``PRIOR_AFTER`` intervals, the
        drift goes on toward the priors: the agent's ping round trip and the default
        bandwidth, so that the next request measures the link again.
        """
        self.idle += 1
        rtt_goal, per_byte_goal = self.best_rtt_ms, self.best_ms_per_byte
        if self.idle >= PRIOR_AFTER:
            if self.samples - self.large < TRUSTED_SAMPLES:
                rtt_goal = min(rtt_goal, ping_rtt_ms)
            if self.large < TRUSTED_SAMPLES:
                per_byte_goal = min(per_byte_goal, DEFAULT_MS_PER_BYTE)
        if rtt_goal < self.rtt_ms:
            self.rtt_ms += RTT_ALPHA * (rtt_goal - self.rtt_ms)
        if per_byte_goal < self.ms_per_byte:
            self.ms_per_byte += RTT_ALPHA * (per_byte_goal - self.ms_per_byte)


def _low(best: float, value: float) -> float:
    """A low envelope: follows a fall at once, a rise at 1 % per sample."""
    return value if value < best else best + 0.01 * (value - best)


class IndexedSet:
    """A set with O(1) add, discard and uniform sampling (a list plus positions).

    Iteration order is insertion order, perturbed only by removals (swap with the last),
    so it is the same in every process: the simulator's determinism relies on it.
    """

    __slots__ = ("_pos", "items")

    def __init__(self) -> None:
        self.items: list[NodeView] = []
        self._pos: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[NodeView]:
        return iter(self.items)

    def __contains__(self, node: str) -> bool:
        return node in self._pos

    def add(self, view: NodeView) -> None:
        if view.node not in self._pos:
            self._pos[view.node] = len(self.items)
            self.items.append(view)

    def discard(self, node: str) -> None:
        i = self._pos.pop(node, None)
        if i is None:
            return
        last = self.items.pop()
        if i < len(self.items):
            self.items[i] = last
            self._pos[last.node] = i


class ClassPriors:
    """Service times per (GPU class, model), learnt from the nodes that have run it.

    ``get`` falls back to the slowest measured class of the model: for a node nobody
    has measured, assuming it is slow costs an early offload; assuming it is fast
    would send it a burst it cannot serve.
    """

    def __init__(self) -> None:
        self._by_class: dict[tuple[str, str], list[float]] = {}  # -> [mean, p95, measured]
        self._slowest: dict[str, tuple[float, float]] = {}

    def observe(self, gpu: str, model: str, mean_ms: float, p95_ms: float,
                warmup: bool = False) -> None:
        """Learn from a node's report. A ``warmup`` figure (a run before any request)
        only seeds a class nobody has measured, with an assumed tail; the first real
        measurement replaces the seed."""
        cur = self._by_class.get((gpu, model))
        if warmup:
            if cur is None:
                self._by_class[(gpu, model)] = [mean_ms, mean_ms * WARMUP_P95, 0.0]
                self._note(model, mean_ms, mean_ms * WARMUP_P95)
            return
        if cur is None or not cur[2]:
            cur = self._by_class[(gpu, model)] = [mean_ms, p95_ms, 1.0]
        else:
            cur[0] += PRIOR_ALPHA * (mean_ms - cur[0])
            cur[1] += PRIOR_ALPHA * (p95_ms - cur[1])
        self._note(model, cur[0], cur[1])

    def _note(self, model: str, mean_ms: float, p95_ms: float) -> None:
        slow = self._slowest.get(model)
        if slow is None or mean_ms >= slow[0]:
            self._slowest[model] = (mean_ms, p95_ms)

    def get(self, gpu: str, model: str) -> tuple[float, float]:
        cur = self._by_class.get((gpu, model))
        if cur is not None:
            return cur[0], cur[1]
        return self._slowest.get(model, (0.0, 0.0))


class Backlog:
    """Our outstanding work at one node, by deadline (the agent's run order) and by age.

    Entries are (deadline, seq, expected service ms); ``seq`` grows per dispatch, and
    the dict keeps dispatch order, so the oldest entries are O(1) to find.
    """

    __slots__ = ("_seq", "by_age", "by_deadline")

    def __init__(self) -> None:
        self.by_deadline: list[tuple[float, int, float]] = []
        self.by_age: dict[int, tuple[float, int, float]] = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self.by_deadline)

    def add(self, deadline_ms: float, service_ms: float) -> None:
        self._seq += 1
        entry = (deadline_ms, self._seq, service_ms)
        insort(self.by_deadline, entry)
        self.by_age[self._seq] = entry

    def remove(self, deadline_ms: float | None) -> None:
        """Drop the entry due at ``deadline_ms`` (None, or not found: the oldest)."""
        if not self.by_deadline:
            return
        i = 0 if deadline_ms is None else bisect_left(self.by_deadline, (deadline_ms, -1, 0.0))
        if i >= len(self.by_deadline) or self.by_deadline[i][0] != deadline_ms:
            oldest = next(iter(self.by_age.values()))
            i = bisect_left(self.by_deadline, oldest)
        entry = self.by_deadline.pop(i)
        del self.by_age[entry[1]]

    def ahead_of(self, deadline_ms: float | None, slots: int,
                 fallback_ms: float) -> tuple[int, float]:
        """(count, expected ms) of our work that runs before a request due at
        ``deadline_ms``: the ``slots`` oldest (taken to be running), the rest due
        earlier, and one job due later — non-preemptive EDF's blocking term: a job due
        later that reaches a free slot before ours does runs first. Entries placed
        without an expected time cost ``fallback_ms``."""
        busy = {e[1] for e in islice(self.by_age.values(), slots)}
        k = len(self.by_deadline) if deadline_ms is None else \
            bisect_right(self.by_deadline, (deadline_ms, 1 << 62, 0.0))
        n, work, blocking = 0, 0.0, 0.0
        for i, (_, seq, ms) in enumerate(self.by_deadline):
            ms = ms or fallback_ms
            if i < k or seq in busy:
                n += 1
                work += ms
            elif ms > blocking:
                blocking = ms
        return n + (blocking > 0), work + blocking


@dataclass(eq=False)
class NodeView:
    node: str
    status: NodeStatus
    load: LoadReport | None = None
    last_seen_ms: float = 0.0
    report_gap_ms: float = DEFAULT_REPORT_GAP_MS  # learned: time between its load reports
    outstanding: int = 0  # dispatched by us, not yet answered
    dispatched_since_load: int = 0  # placed since the node's last report
    answered_since_load: int = 0  # of ours answered since then
    link: Link = field(default_factory=Link)
    placements: int = 0
    work: Backlog = field(default_factory=lambda: Backlog())
    priors: ClassPriors | None = None
    version: int = 0  # bumped on every change of load; the least-loaded heap checks it
    # Derived from the latest status and load, once per report rather than per request:
    idle: bool = False  # has a free slot: it is in its groups' ``free`` sets
    mix_ms: float = 0.0  # mean service time over the node's model mix
    reported: int = 0  # queue + in flight at the last report
    capacity: int = 1  # most requests it accepts (queued + running)
    measured: dict[str, tuple[float, float]] = field(default_factory=dict)  # (mean, p95)
    warmup: dict[str, tuple[float, float]] = field(default_factory=dict)  # too few runs yet
    batches: dict[str, tuple[BatchPoint, ...]] = field(default_factory=dict)  # batching models

    def __post_init__(self) -> None:
        self.capacity = self.status.concurrency

    @property
    def role(self) -> str:
        return self.status.role

    @property
    def concurrency(self) -> int:
        return self.status.concurrency

    def apply(self, load: LoadReport | None) -> None:
        """Take a new report (None: forget the last one, the agent restarted)."""
        self.load = load
        self.dispatched_since_load = self.answered_since_load = 0
        self.reported = load.queue + load.in_flight if load else 0
        self.capacity = load.capacity if load else self.status.concurrency
        models = load.models if load else {}
        self.measured = {m: (s.mean_ms, s.p95_ms) for m, s in models.items()
                         if s.count >= MIN_SAMPLES}
        self.warmup = {m: (s.mean_ms, s.mean_ms * WARMUP_P95) for m, s in models.items()
                       if s.count < MIN_SAMPLES and s.mean_ms > 0}
        self.batches = {m: s.batches for m, s in models.items() if len(s.batches) > 1}

    def ahead(self) -> int:
        """Requests at the node: its last report, plus what we placed there since, less
        what of ours it answered since; at least what we have outstanding there."""
        total = self.reported + self.dispatched_since_load - self.answered_since_load
        return self.outstanding if self.outstanding > total else total

    def wait_ms(self, model: str, deadline_ms: float | None = None) -> float:
        """Expected wait for a free slot, for a request of ``model`` due at ``deadline_ms``.

        Counts what runs first. The agent's queue is earliest-deadline-first and does
        not preempt: our oldest work is taken to be running, our queued work due
        earlier (all of it without ``deadline_ms``) runs first, and work we know
        nothing of (another broker's, or finished since the report) counts too, to stay
        on the safe side. Ours is costed at the service time expected when it was
        placed, the rest at the node's mean over its model mix.
        """
        total, slots = self.ahead(), self.status.concurrency
        if total < slots:
            return 0.0
        fallback = self.mix_ms or self.service_ms(model)[0]
        n, work = self.work.ahead_of(deadline_ms, slots, fallback)
        unknown = total - len(self.work)
        n += unknown
        if n < slots:
            return 0.0
        work += unknown * fallback
        wait = (n - slots + 1) / slots * (work / n)
        curve = self.batches.get(model)
        if curve is None:
            return wait
        # A batching node drains its queue in batches as deep as the queue per slot,
        # up to the largest it has run (skyhop.batching): each request ahead costs its
        # share of a batch, and ours runs in one, for a batch's time.
        k = min(n / slots, curve[-1].size)
        return wait * amortised(curve, k) + batch_ms(curve, k) - batch_ms(curve, 1)

    def has_credit(self) -> bool:
        return self.outstanding < self.capacity

    def service_ms(self, model: str) -> tuple[float, float]:
        """(mean, p95) service time of ``model`` here: measured on this node if it has
        run it ``MIN_SAMPLES`` times, else its GPU class's, else its warm-up run's."""
        own = self.measured.get(model)
        if own is not None:
            return own
        if self.priors is not None:
            prior = self.priors.get(self.status.gpu, model)
            if prior[0] > 0:
                return prior
        return self.warmup.get(model, (0.0, 0.0))



@dataclass(eq=False)
class Group:
    """The online nodes of one (role, GPU class) that serve one model."""

    role: str
    gpu: str
    members: IndexedSet = field(default_factory=IndexedSet)
    min_rtt_ms: float = float("inf")  # best case of any member seen: a lower bound
    min_ms_per_byte: float = DEFAULT_MS_PER_BYTE
    free: IndexedSet = field(default_factory=IndexedSet)  # members with a free slot


@dataclass(eq=False)
class ModelIndex:
    """Everything placement needs to find candidates for one model without a scan."""

    model: str
    all: IndexedSet = field(default_factory=IndexedSet)
    groups: dict[tuple[str, str], Group] = field(default_factory=dict)
    cursor: int = 0  # round-robin position
    # Least-loaded heap: (load ratio, node, version) entries, stale ones skipped.
    heap: list[tuple[float, str, int]] | None = None
    # Placement's cost order of the groups per role, and when it was computed.
    order: dict[str, tuple[float, int, list[Group]]] = field(default_factory=dict)

    def group(self, role: str, gpu: str) -> Group:
        g = self.groups.get((role, gpu))
        if g is None:
            g = self.groups[(role, gpu)] = Group(role, gpu)
        return g


class Fleet:
    def __init__(self, node_timeout_ms: float = 5000.0,
                 gpu_speed: dict[str, float] | None = None) -> None:
        self.node_timeout_ms = node_timeout_ms
        self.gpu_speed = GPU_SPEED if gpu_speed is None else gpu_speed
        self.nodes: dict[str, NodeView] = {}
        self.indexes: dict[str, ModelIndex] = {}
        self.known_models: set[str] = set()
        self.priors = ClassPriors()
        self._expiry: list[tuple[float, str]] = []  # lazy heap of (due, node)
        self.listening_since_ms = -math.inf  # since our last (re)connect: ``listening``

    # -- updates ------------------------------------------------------------------------

    def on_status(self, status: NodeStatus, now_ms: float) -> bool:
        """Apply a birth or death; return True if the node just went offline."""
        view = self.nodes.get(status.node)
        if view is not None and status.session < view.status.session:
            return False  # a stale will from an older run of the agent
        was_live = view is not None and self.is_live(view, now_ms)
        if view is None:
            view = self.nodes[status.node] = NodeView(status.node, status, priors=self.priors)
        else:
            self._unindex(view)  # its models, class or role may have changed
            restarted = status.session > view.status.session
            view.status = status
            if restarted:
                view.apply(None)  # a restarted agent: old telemetry means nothing
                view.mix_ms = 0.0
            elif view.load is None:
                view.capacity = status.concurrency
        self._seen(view, now_ms)
        self._index(view)
        return was_live and not status.online

    def on_load(self, load: LoadReport, now_ms: float, retained: bool = False) -> None:
        """Apply a load report. A ``retained`` one is the MQTT server's copy of the last
        report, handed over at subscribe: it outlives its agent, so it fills in what a
        live node last said but is no evidence that the node lives."""
        view = self.nodes.get(load.node)
        if view is None or load.session != view.status.session:
            return  # load before its birth, or from an older run: wait for the birth
        if retained and not view.status.online:
            return  # a stopped or dead node's last report: it stays offline
        if view.load is not None and load.seq <= view.load.seq:
            return  # reordered or retained duplicate
        if view.load is not None and view.dispatched_since_load == 0:
            view.link.relax(load.rtt_ms)
        if view.load is not None:  # a gap after an outage counts for at most 2 gaps
            gap = min(now_ms - view.last_seen_ms, 2 * view.report_gap_ms)
            view.report_gap_ms += RTT_ALPHA * (gap - view.report_gap_ms)
        view.apply(load)
        if not retained:
            self._seen(view, now_ms)
        self._learn(view, load)
        if not view.status.online:  # a load report proves the session is alive
            view.status = replace(view.status, online=True)
            self._index(view)
        if view.link.samples == 0:
            view.link.rtt_ms = load.rtt_ms
            for model in view.status.models:
                self._bound(view, model)
        self._touch(view)

    def _learn(self, view: NodeView, load: LoadReport) -> None:
        total = weighted = 0.0
        for model, stats in load.models.items():
            if stats.count >= MIN_SAMPLES or stats.mean_ms > 0:
                self.priors.observe(view.status.gpu, model, stats.mean_ms, stats.p95_ms,
                                    warmup=stats.count < MIN_SAMPLES)
            if stats.count > 0:
                total += stats.count
                weighted += stats.count * stats.mean_ms
        view.mix_ms = weighted / total if total else 0.0

    def _seen(self, view: NodeView, now_ms: float) -> None:
        view.last_seen_ms = now_ms
        heapq.heappush(self._expiry, (now_ms + self.node_timeout_ms, view.node))

    def _index(self, view: NodeView) -> None:
        for model in view.status.models:
            self.known_models.add(model)
            if not view.status.online or view.status.draining:  # nothing new for it
                continue
            idx = self.indexes.get(model)
            if idx is None:
                idx = self.indexes[model] = ModelIndex(model)
            idx.all.add(view)
            idx.group(view.status.role, view.status.gpu).members.add(view)
            self._bound(view, model)
        self._touch(view)

    def _unindex(self, view: NodeView) -> None:
        for model in view.status.models:
            idx = self.indexes.get(model)
            if idx is not None and view.node in idx.all:
                idx.all.discard(view.node)
                g = idx.group(view.status.role, view.status.gpu)
                g.members.discard(view.node)
                g.free.discard(view.node)
        view.idle = False

    def _bound(self, view: NodeView, model: str) -> None:
        idx = self.indexes.get(model)
        if idx is None or view.node not in idx.all:
            return
        if view.link.samples == 0 and view.load is None:
            return  # a birth before any report: its link is unknown, not 0 ms away
        g = idx.group(view.status.role, view.status.gpu)
        g.min_rtt_ms = min(g.min_rtt_ms, view.link.rtt_ms)
        g.min_ms_per_byte = min(g.min_ms_per_byte, view.link.ms_per_byte)

    def _touch(self, view: NodeView) -> None:
        """The node's load changed: recount its groups' idle nodes, feed the heaps."""
        view.version += 1
        idle = view.status.online and view.ahead() < view.status.concurrency
        flip, view.idle = idle != view.idle, idle
        for model in view.status.models:
            idx = self.indexes.get(model)
            if idx is None or view.node not in idx.all:
                continue
            if flip:
                free = idx.group(view.status.role, view.status.gpu).free
                if idle:
                    free.add(view)
                else:
                    free.discard(view.node)
            if idx.heap is not None:
                heapq.heappush(idx.heap, (load_ratio(view), view.node, view.version))

    def dispatched(self, node: str, deadline_ms: float | None = None,
                   service_ms: float = 0.0) -> None:
        """Count work placed on ``node``. Pass its deadline and expected service time
        (``Decision.service_ms``) for the earliest-deadline-first wait estimate."""
        view = self.nodes[node]
        view.outstanding += 1
        view.dispatched_since_load += 1
        view.placements += 1
        # Unknown deadline: file it first, so that it counts ahead of everything.
        view.work.add(float("-inf") if deadline_ms is None else deadline_ms, service_ms)
        self._touch(view)

    def answered(self, node: str, network_ms: float | None = None, size: int = 0,
                 deadline_ms: float | None = None) -> None:
        view = self.nodes.get(node)
        if view is None:
            return
        view.outstanding = max(0, view.outstanding - 1)
        view.answered_since_load += 1
        view.work.remove(deadline_ms)
        if network_ms is not None:
            view.link.observe(network_ms, size)
            for model in view.status.models:
                self._bound(view, model)
        self._touch(view)

    # -- queries ------------------------------------------------------------------------

    def listening(self, now_ms: float) -> None:
        """We were away (our connection to the MQTT server dropped): silence until now
        says nothing of the nodes."""
        self.listening_since_ms = now_ms

    def quiet_ms(self, view: NodeView, now_ms: float) -> float:
        """How long ``view`` has been silent past ``QUIET_GAPS`` report gaps (0 if not),
        counted while we listened.

        Placement adds it to a prediction: an outage that has lasted Q ms is likely to
        last about as long again (nothing better is known of a cut link), so a quiet
        node takes only work whose budget would outlast that, and loses the rest to
        nodes that report, well before ``node_timeout_s`` counts it offline.
        """
        heard = max(view.last_seen_ms, self.listening_since_ms)
        return max(0.0, now_ms - heard - QUIET_GAPS * view.report_gap_ms)

    def is_live(self, view: NodeView, now_ms: float) -> bool:
        return view.status.online and now_ms - view.last_seen_ms <= self.node_timeout_ms

    def index(self, model: str) -> ModelIndex | None:
        """The model's candidate index (online nodes; check ``is_live`` per node)."""
        return self.indexes.get(model)

    def candidates(self, model: str, now_ms: float) -> list[NodeView]:
        """Live nodes that serve ``model``, in a stable order. O(n log n): for tools and
        tests, never per request."""
        idx = self.indexes.get(model)
        views = idx.all.items if idx else []
        return sorted((v for v in views if self.is_live(v, now_ms)), key=lambda v: v.node)

    def least_loaded(self, model: str, accept: Callable[[NodeView], bool]) -> NodeView | None:
        """The least loaded online node of ``model`` that ``accept`` takes, in O(log n).

        The heap is built on the first call and kept up to date from then on; entries
        that a later change superseded are skipped, and the heap is rebuilt when they
        outnumber the live ones.
        """
        idx = self.indexes.get(model)
        if idx is None:
            return None
        if idx.heap is None or len(idx.heap) > 4 * len(idx.all) + 64:
            idx.heap = [(load_ratio(v), v.node, v.version) for v in idx.all]
            heapq.heapify(idx.heap)
        heap, declined, found = idx.heap, [], None
        while heap and found is None:
            entry = heapq.heappop(heap)
            view = self.nodes.get(entry[1])
            if view is None or entry[2] != view.version or entry[1] not in idx.all:
                continue  # superseded by a later entry
            declined.append(entry)
            if accept(view):
                found = view
        for entry in declined:
            heapq.heappush(heap, entry)
        return found

    def unreachable(self, node: str) -> None:
        """``node`` is not connected (the MQTT server had nobody on its work topic):
        offline until its next load report or birth says otherwise."""
        view = self.nodes.get(node)
        if view is not None and view.status.online:
            self._unindex(view)
            view.status = replace(view.status, online=False)

    def expire(self, now_ms: float) -> list[str]:
        """Mark nodes silent for longer than the timeout offline; return their ids."""
        dead: list[str] = []
        while self._expiry and self._expiry[0][0] < now_ms:
            _, node = heapq.heappop(self._expiry)
            view = self.nodes.get(node)
            if view is None or not view.status.online:
                continue
            if now_ms - view.last_seen_ms > self.node_timeout_ms:
                self._unindex(view)
                view.status = replace(view.status, online=False)
                dead.append(node)
        return dead


def load_ratio(view: NodeView) -> float:
    """Requests ahead per parallel slot: what least-connection and power-of-two compare."""
    return view.ahead() / view.status.concurrency


