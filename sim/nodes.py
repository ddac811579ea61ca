"""Simulated agents: the real agent's queue (``WorkQueue``) and estimator (``ServiceTime``)
behind a scripted service time, and what they publish (``NodeStatus``, ``LoadReport``)."""

from __future__ import annotations

from edge_agent.workqueue import WorkQueue
from skyhop.batching import BatchPoint, BatchTimes, curve
from skyhop.protocol.messages import LoadReport, ModelLoad, NodeStatus
from skyhop.stats import ServiceTime


class SimRequest:
    """One request as the nodes and the report see it; the broker's side of its life is
    the dispatcher's ``Pending``."""

    __slots__ = ("arrival", "budget", "deadline", "factor", "feasible", "id", "model", "origin",
                 "priority", "reply_size", "size", "where")

    def __init__(self, rid: int, model: str, arrival: float, budget: float, priority: int,
                 size: int, reply_size: int, factor: float, origin: str) -> None:
        self.id, self.model, self.arrival, self.budget = rid, model, arrival, budget
        self.deadline = arrival + budget
        self.priority, self.size, self.reply_size = priority, size, reply_size
        self.factor, self.origin = factor, origin
        self.feasible = False
        self.where = ""  # the role of the node that ran it


class SimNode:
    """One agent: its hardware (speed, slots), link, queue and published telemetry."""

    __slots__ = (
        "batch_times",
        "batching",
        "busy",
        "capacity",
        "concurrency",
        "gpu",
        "models",
        "ms_per_byte",
        "name",
        "priors",
        "queue",
        "retiring",
        "role",
        "rtt_ms",
        "running",
        "seq",
        "service",
        "session",
        "site",
        "speed",
        "up",
    )

    def __init__(self, name: str, role: str, gpu: str, speed: float, concurrency: int,
                 queue_capacity: int, models: tuple[str, ...], rtt_ms: float,
                 bandwidth_mbps: float, site: int, priors: dict[str, float],
                 batching: dict[str, int] | None = None) -> None:
        self.name, self.role, self.gpu, self.speed = name, role, gpu, speed
        self.concurrency, self.capacity = concurrency, queue_capacity
        self.models, self.rtt_ms, self.site = models, rtt_ms, site
        self.ms_per_byte = 8 / (bandwidth_mbps * 1000)
        self.priors = priors  # the agent's warm-up run: one measurement per model
        self.batching = batching or {}  # model -> max batch, for the models that batch
        self.batch_times: dict[str, BatchTimes] = {}
        self.session = 0
        self.up = False
        self.retiring = False
        self.busy = 0  # slots running a batch (of one, where the model does not batch)
        self.running = 0  # requests in those batches
        self.seq = 0
        self.queue = WorkQueue(queue_capacity)
        self.service: dict[str, ServiceTime] = {}

    def boot(self, session: int) -> None:
        """(Re)start the agent: a fresh process has an empty queue and fresh estimates."""
        self.session, self.up, self.retiring, self.busy, self.seq = session, True, False, 0, 0
        self.running = 0
        self.queue = WorkQueue(self.capacity)
        self.service = {m: ServiceTime(prior_ms=self.priors[m]) for m in self.models}
        self.batch_times = {m: BatchTimes() for m in self.batching if m in self.models}

    def one_way_ms(self, size: int) -> float:
        return self.rtt_ms / 2 + size * self.ms_per_byte

    def status(self, online: bool) -> NodeStatus:
        return NodeStatus(node=self.name, online=online, session=self.session, role=self.role,
                          models=self.models, gpu=self.gpu, concurrency=self.concurrency)

    def load_report(self) -> LoadReport:
        self.seq += 1
        return LoadReport(
            node=self.name, session=self.session, seq=self.seq, queue=len(self.queue),
            in_flight=self.running, capacity=self.capacity + self.concurrency, rtt_ms=self.rtt_ms,
            gpu_util=min(1.0, self.busy / self.concurrency), probe="sim",
            models={m: ModelLoad(s.mean_ms, s.p95_ms, s.count,
                                 self.curve(m) if m in self.batch_times else ())
                    for m, s in self.service.items()},
        )

    def curve(self, model: str) -> tuple[BatchPoint, ...]:
        return curve(self.batch_times.get(model), self.service[model])

    @property
    def ongoing(self) -> int:
        return self.running + len(self.queue)
