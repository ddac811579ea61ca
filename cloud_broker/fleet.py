"""The broker's view of the fleet, rebuilt from status and load messages. Pure.

A node is *live* when its latest status says online and it has reported within
``node_timeout_ms``. Telemetry is stale by up to one report interval, so the view also
counts what this broker has dispatched and not yet seen answered (``outstanding``):
that number is exact for work placed here, and the placement adds it to the queue
the node last reported.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from skyhop.messages import LoadReport, NodeStatus

DEFAULT_MS_PER_BYTE = 8 / 50_000  # 50 Mbit/s until a link is measured
RTT_ALPHA = 0.2


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


@dataclass
class NodeView:
    node: str
    status: NodeStatus
    load: LoadReport | None = None
    last_seen_ms: float = 0.0
    outstanding: int = 0  # dispatched by us, not yet answered
    dispatched_since_load: int = 0  # placed since the node's last report
    link: Link = field(default_factory=Link)
    placements: int = 0

    @property
    def role(self) -> str:
        return self.status.role

    @property
    def concurrency(self) -> int:
        return self.status.concurrency

    @property
    def capacity(self) -> int:
        return self.load.capacity if self.load else self.status.concurrency

    def ahead(self) -> int:
        """Requests ahead of a new one: the larger of reported-plus-since and our own count."""
        reported = (self.load.queue + self.load.in_flight) if self.load else 0
        return max(reported + self.dispatched_since_load, self.outstanding)

    def has_credit(self) -> bool:
        return self.outstanding < self.capacity

    def service_ms(self, model: str) -> tuple[float, float]:
        """(mean, p95) service time of ``model`` here, or (0, 0) if unmeasured."""
        stats = self.load.models.get(model) if self.load else None
        return (stats.mean_ms, stats.p95_ms) if stats else (0.0, 0.0)


class Fleet:
    def __init__(self, node_timeout_ms: float = 5000.0) -> None:
        self.node_timeout_ms = node_timeout_ms
        self.nodes: dict[str, NodeView] = {}
        self._by_model: dict[str, set[str]] = defaultdict(set)
        self.known_models: set[str] = set()

    # -- updates ------------------------------------------------------------------------

    def on_status(self, status: NodeStatus, now_ms: float) -> bool:
        """Apply a birth or death; return True if the node just went offline."""
        view = self.nodes.get(status.node)
        if view is not None and status.session < view.status.session:
            return False  # a stale will from an older run of the agent
        was_live = view is not None and self.is_live(view, now_ms)
        if view is None:
            view = self.nodes[status.node] = NodeView(status.node, status)
        else:
            if status.session > view.status.session:
                view.load = None  # a restarted agent: old telemetry means nothing
            view.status = status
        view.last_seen_ms = now_ms
        self._index(view)
        return was_live and not status.online

    def on_load(self, load: LoadReport, now_ms: float) -> None:
        view = self.nodes.get(load.node)
        if view is None or load.session != view.status.session:
            return  # load before its birth, or from an older run: wait for the birth
        if view.load is not None and load.seq <= view.load.seq:
            return  # reordered or retained duplicate
        view.load = load
        view.last_seen_ms = now_ms
        view.dispatched_since_load = 0
        if not view.status.online:  # a load report proves the session is alive
            view.status = _with_online(view.status)
            self._index(view)
        if view.link.samples == 0:
            view.link.rtt_ms = load.rtt_ms

    def _index(self, view: NodeView) -> None:
        for model in view.status.models:
            self.known_models.add(model)
            if view.status.online:
                self._by_model[model].add(view.node)
            else:
                self._by_model[model].discard(view.node)

    def dispatched(self, node: str) -> None:
        view = self.nodes[node]
        view.outstanding += 1
        view.dispatched_since_load += 1
        view.placements += 1

    def answered(self, node: str, network_ms: float | None = None, size: int = 0) -> None:
        view = self.nodes.get(node)
        if view is None:
            return
        view.outstanding = max(0, view.outstanding - 1)
        if network_ms is not None:
            view.link.observe(network_ms, size)

    # -- queries ------------------------------------------------------------------------

    def is_live(self, view: NodeView, now_ms: float) -> bool:
        return view.status.online and now_ms - view.last_seen_ms <= self.node_timeout_ms

    def candidates(self, model: str, now_ms: float) -> list[NodeView]:
        """Live nodes that serve ``model``, in a stable order."""
        return [self.nodes[n] for n in sorted(self._by_model.get(model, ()))
                if self.is_live(self.nodes[n], now_ms)]

    def expire(self, now_ms: float) -> list[str]:
        """Mark nodes silent for longer than the timeout offline; return their ids."""
        dead = [v.node for v in self.nodes.values()
                if v.status.online and now_ms - v.last_seen_ms > self.node_timeout_ms]
        for node in dead:
            view = self.nodes[node]
            view.status = _with_online(view.status, False)
            self._index(view)
        return dead


def _with_online(status: NodeStatus, online: bool = True) -> NodeStatus:
    from dataclasses import replace

    return replace(status, online=online)
