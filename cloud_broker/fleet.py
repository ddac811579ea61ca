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
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from skyhop.messages import LoadReport, NodeStatus

DEFAULT_MS_PER_BYTE = 8 / 50_000  # 50 Mbit/s until a link is measured
RTT_ALPHA = 0.2
PRIOR_ALPHA = 0.1  # class priors move slowly: one odd node must not reprice its class

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
    the round trip, large ones the per-byte cost.
    """

    rtt_ms: float = 0.0
    ms_per_byte: float = DEFAULT_MS_PER_BYTE
    samples: int = 0

    def predict_ms(self, size: int) -> float:
        return self.rtt_ms + size * self.ms_per_byte

    def observe(self, network_ms: float, size: int) -> None:
        network_ms = max(0.0, network_ms)
        self.samples += 1
        transfer = network_ms - self.rtt_ms
        if size < 16_384 or self.samples == 1:
            self.rtt_ms += RTT_ALPHA * (network_ms - self.rtt_ms) if self.samples > 1 else network_ms
        elif transfer > 0:
            self.ms_per_byte += RTT_ALPHA * (transfer / size - self.ms_per_byte)


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
        self._by_class: dict[tuple[str, str], list[float]] = {}  # -> [mean, p95]
        self._slowest: dict[str, tuple[float, float]] = {}

    def observe(self, gpu: str, model: str, mean_ms: float, p95_ms: float) -> None:
        cur = self._by_class.get((gpu, model))
        if cur is None:
            cur = self._by_class[(gpu, model)] = [mean_ms, p95_ms]
        else:
            cur[0] += PRIOR_ALPHA * (mean_ms - cur[0])
            cur[1] += PRIOR_ALPHA * (p95_ms - cur[1])
        slow = self._slowest.get(model)
        if slow is None or cur[0] >= slow[0]:
            self._slowest[model] = (cur[0], cur[1])

    def get(self, gpu: str, model: str) -> tuple[float, float]:
        cur = self._by_class.get((gpu, model))
        if cur is not None:
            return cur[0], cur[1]
        return self._slowest.get(model, (0.0, 0.0))


@dataclass(eq=False)
class NodeView:
    node: str
    status: NodeStatus
    load: LoadReport | None = None
    last_seen_ms: float = 0.0
    outstanding: int = 0  # dispatched by us, not yet answered
    dispatched_since_load: int = 0  # placed since the node's last report
    link: Link = field(default_factory=Link)
    placements: int = 0
    # Deadlines of our outstanding work, sorted: the agent's queue is earliest-deadline
    # first, so a new request waits only for work due before it (see ``ahead``).
    deadlines: list[float] = field(default_factory=list)
    priors: ClassPriors | None = None
    version: int = 0  # bumped on every change of load; the least-loaded heap checks it
    mix_ms: float = 0.0  # mean service time over the node's model mix, from its report

    @property
    def role(self) -> str:
        return self.status.role

    @property
    def concurrency(self) -> int:
        return self.status.concurrency

    @property
    def capacity(self) -> int:
        return self.load.capacity if self.load else self.status.concurrency

    def ahead(self, deadline_ms: float | None = None) -> int:
        """Requests ahead of a new one: the larger of reported-plus-since and our own count.

        With ``deadline_ms``, only work that the node's earliest-deadline-first queue
        runs first counts: what is running (it is not preempted), our queued work due
        earlier, and work we know nothing of (another broker's, or finished since the
        report: counted, to stay on the safe side).
        """
        reported = (self.load.queue + self.load.in_flight) if self.load else 0
        total = max(reported + self.dispatched_since_load, self.outstanding)
        if deadline_ms is None or total <= self.status.concurrency:
            return total
        running = self.status.concurrency
        earlier = bisect_right(self.deadlines, deadline_ms)
        unknown = total - len(self.deadlines)
        return min(total, running + max(0, earlier - running) + max(0, unknown))

    def has_credit(self) -> bool:
        return self.outstanding < self.capacity

    def service_ms(self, model: str) -> tuple[float, float]:
        """(mean, p95) service time of ``model`` here; the class prior if unmeasured."""
        stats = self.load.models.get(model) if self.load else None
        if stats is not None and (stats.count > 0 or stats.mean_ms > 0):
            return stats.mean_ms, stats.p95_ms
        if self.priors is not None:
            return self.priors.get(self.status.gpu, model)
        return 0.0, 0.0

    def per_job_ms(self, model: str) -> float:
        """Mean time one queued job holds a slot: the node's model mix, else ``model``."""
        return self.mix_ms or self.service_ms(model)[0]


@dataclass(eq=False)
class Group:
    """The online nodes of one (role, GPU class) that serve one model."""

    role: str
    gpu: str
    members: IndexedSet = field(default_factory=IndexedSet)
    min_rtt_ms: float = float("inf")  # best case of any member seen: a lower bound
    min_ms_per_byte: float = DEFAULT_MS_PER_BYTE


@dataclass(eq=False)
class ModelIndex:
    """Everything placement needs to find candidates for one model without a scan."""

    model: str
    all: IndexedSet = field(default_factory=IndexedSet)
    groups: dict[tuple[str, str], Group] = field(default_factory=dict)
    cursor: int = 0  # round-robin position
    # Least-loaded heap: (load ratio, node, version) entries, stale ones skipped.
    heap: list[tuple[float, str, int]] | None = None

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
            if status.session > view.status.session:
                view.load = None  # a restarted agent: old telemetry means nothing
                view.mix_ms = 0.0
            view.status = status
        self._seen(view, now_ms)
        self._index(view)
        return was_live and not status.online

    def on_load(self, load: LoadReport, now_ms: float) -> None:
        view = self.nodes.get(load.node)
        if view is None or load.session != view.status.session:
            return  # load before its birth, or from an older run: wait for the birth
        if view.load is not None and load.seq <= view.load.seq:
            return  # reordered or retained duplicate
        view.load = load
        view.dispatched_since_load = 0
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
            if stats.count > 0:
                self.priors.observe(view.status.gpu, model, stats.mean_ms, stats.p95_ms)
                total += stats.count
                weighted += stats.count * stats.mean_ms
        view.mix_ms = weighted / total if total else 0.0

    def _seen(self, view: NodeView, now_ms: float) -> None:
        view.last_seen_ms = now_ms
        heapq.heappush(self._expiry, (now_ms + self.node_timeout_ms, view.node))

    def _index(self, view: NodeView) -> None:
        for model in view.status.models:
            self.known_models.add(model)
            if not view.status.online:
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
            if idx is not None:
                idx.all.discard(view.node)
                idx.group(view.status.role, view.status.gpu).members.discard(view.node)

    def _bound(self, view: NodeView, model: str) -> None:
        idx = self.indexes.get(model)
        if idx is None or view.node not in idx.all:
            return
        g = idx.group(view.status.role, view.status.gpu)
        g.min_rtt_ms = min(g.min_rtt_ms, view.link.rtt_ms)
        g.min_ms_per_byte = min(g.min_ms_per_byte, view.link.ms_per_byte)

    def _touch(self, view: NodeView) -> None:
        """The node's load changed: feed the least-loaded heaps that exist."""
        view.version += 1
        for model in view.status.models:
            idx = self.indexes.get(model)
            if idx is not None and idx.heap is not None and view.node in idx.all:
                heapq.heappush(idx.heap, (load_ratio(view), view.node, view.version))

    def dispatched(self, node: str, deadline_ms: float | None = None) -> None:
        """Count work placed on ``node``; pass its deadline for the EDF-aware estimate."""
        view = self.nodes[node]
        view.outstanding += 1
        view.dispatched_since_load += 1
        view.placements += 1
        # Unknown deadline: file it first, so that it counts ahead of everything.
        insort(view.deadlines, float("-inf") if deadline_ms is None else deadline_ms)
        self._touch(view)

    def answered(self, node: str, network_ms: float | None = None, size: int = 0,
                 deadline_ms: float | None = None) -> None:
        view = self.nodes.get(node)
        if view is None:
            return
        view.outstanding = max(0, view.outstanding - 1)
        _remove(view.deadlines, deadline_ms)
        if network_ms is not None:
            view.link.observe(network_ms, size)
            for model in view.status.models:
                self._bound(view, model)
        self._touch(view)

    # -- queries ------------------------------------------------------------------------

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


def _remove(deadlines: list[float], deadline_ms: float | None) -> None:
    if not deadlines:
        return
    if deadline_ms is None:
        del deadlines[0]
        return
    i = bisect_left(deadlines, deadline_ms)
    if i < len(deadlines) and deadlines[i] == deadline_ms:
        del deadlines[i]
    else:
        del deadlines[0]  # dispatched without a deadline: the -inf placeholder goes
