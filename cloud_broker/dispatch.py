"""The request lifecycle: every change of a request's state lives in this file. Pure.

    d = Dispatcher(Fleet(5_000), DispatchConfig(policy="deadline"), random.Random(1))
    for action in d.accept(Request(id, model, size, budget_ms), now):
        ...                                 # Send: publish the work; Answer: the one reply
    d.reply(Reply(id, "OK", node="cam-1", ...), now)
    d.node_status(status, now); d.node_load(report, now); d.tick(now); d.close(...)

Events come in as method calls, each with ``now`` (ms on the caller's monotonic
clock); what to do comes out as a list of frozen actions. The live broker
(``broker.py``) turns them into MQTT messages, the simulator (``sim/engine.py``) into
events on its virtual clock: both run this one lifecycle, so the simulator judges the
broker's own rules. It owns the fleet view, the tracker, the placement state and the
demand the autoscaler reads.

A request's life (docs/adr/0006-one-request-lifecycle.md)::

    accept ──place──▶ held by node N ──reply OK──────────────▶ answered (the node's reply)
      │                 │  │  └──reply OVERLOADED, budget left──▶ placed again, N excluded
      │                 │  └──N dead (its will), budget left──▶ placed again (N silent: kept)
      │                 └──deadline + grace, or N dead past the deadline──▶ DEADLINE_EXCEEDED
      └──nothing fits──▶ answered at once (INFEASIBLE, UNAVAILABLE, OVERLOADED, …)

A request leaves the tracker exactly once, with exactly one ``Answer``. A reply for a
request already answered is a ``LateReply``. A result from a node that no longer holds
the request (it was re-placed after that node went quiet) still ends it: a result is a
result; an error from such a node is dropped, since the holder may still answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from cloud_broker.demand import DemandCounter, wanted_cloud
from cloud_broker.fleet import Fleet
from cloud_broker.placement import Ask, Decision, PlacementState, Tuning, place
from cloud_broker.tracker import Pending, Request, Tracker
from skyhop.errors import ErrorCode
from skyhop.protocol.messages import OK, LoadReport, NodeStatus

RETRYABLE = frozenset({ErrorCode.OVERLOADED})  # a refusal another node may not give
NODE_LOST = "node_lost"  # ``Redispatch.reason`` when the holder died
UNDELIVERED = "undelivered"  # ... when the MQTT server had nobody on its work topic


@dataclass(frozen=True)
class DispatchConfig:
    policy: str = "deadline"  # placement.POLICIES
    margin: float = 0.9  # plan to finish within margin × budget
    reply_grace_ms: float = 250.0  # wait this long past a deadline: the reply may be on its way
    tuning: Tuning = field(default_factory=Tuning)
    pool_models: frozenset[str] = frozenset()  # what the cloud pool's workers serve, if any


@dataclass(frozen=True, slots=True)
class Reply:
    """What the broker read in a node's reply header."""

    request_id: str
    status: str  # OK or an ErrorCode name
    node: str = ""  # the node that answered ("" from an agent that does not say)
    where: str = ""  # its role: "edge" | "cloud"
    queue_ms: float = 0.0
    service_ms: float = 0.0
    size: int = 0  # the reply's bytes (the request's are added: what the link carried)

    @property
    def ok(self) -> bool:
        return self.status == OK


@dataclass(frozen=True, slots=True)
class Send:
    """Send the request to ``node``, with what is left of its budget."""

    pending: Pending
    node: str
    remaining_ms: float
    attempt: int  # 1 for the first placement
    decision: Decision


@dataclass(frozen=True, slots=True)
class Answer:
    """The request's one terminal reply: the node's own (``forward``), or an error."""

    pending: Pending
    code: str  # OK or an ErrorCode name
    message: str
    latency_ms: float  # from acceptance
    where: str = ""  # the answering node's role, when a node answered
    forward: bool = False  # pass the node's reply on unchanged
    decision: Decision | None = None  # the placement that refused it, if one did
    reply: Reply | None = None  # the node's reply header, when a node answered


@dataclass(frozen=True, slots=True)
class Redispatch:
    """The request is placed again (the next action says where, or why not)."""

    pending: Pending
    reason: str  # the holder's refusal (OVERLOADED) or NODE_LOST


@dataclass(frozen=True, slots=True)
class LateReply:
    """A reply for a request that was answered already (deadline, or another node)."""

    request_id: str


@dataclass(frozen=True, slots=True)
class NodeDown:
    node: str
    session: int | None  # its death's session; None: silent past the node timeout
    stopped: bool = False  # the agent said it stopped cleanly (not its will)


@dataclass(frozen=True, slots=True)
class NodeUp:
    status: NodeStatus


Action = Send | Answer | Redispatch | LateReply | NodeDown | NodeUp


class Dispatcher:
    def __init__(self, fleet: Fleet, config: DispatchConfig, rng: random.Random) -> None:
        self.fleet = fleet
        self.config = config
        self.tracker = Tracker()
        self.placement = PlacementState()
        self.demand = DemandCounter()
        self.pool_ready = 0  # the pool's ready workers, as the shell last counted them
        self._rng = rng

    def __len__(self) -> int:
        return len(self.tracker)

    def holds(self, request_id: str) -> bool:
        return request_id in self.tracker

    # -- events ---------------------------------------------------------------------------

    def accept(self, request: Request, now: float) -> list[Action]:
        """A request that passed the shell's checks (schema, replay, rate): place it."""
        p = Pending(request, now, now + request.budget_ms)
        self.tracker.accept(p)
        return [self._place(p, now)]

    def reply(self, r: Reply, now: float) -> list[Action]:
        p = self.tracker.get(r.request_id)
        if p is None:
            return [LateReply(r.request_id)]
        holder = not r.node or r.node == p.node
        if not holder and not r.ok:
            return [LateReply(r.request_id)]  # its holder may still answer
        network = now - p.dispatched_ms - r.queue_ms - r.service_ms if holder else None
        size = p.request.size + r.size
        self._release(p, network if r.ok else None, size)
        if r.ok:
            self.demand.reply(p.request.model, size)
        elif r.status in RETRYABLE and p.remaining_ms(now) > 0:
            return [Redispatch(p, r.status), self._place(p, now, after=ErrorCode(r.status))]
        self.tracker.complete(r.request_id)
        return [Answer(p, r.status, "", now - p.accepted_ms, r.where, forward=True, reply=r)]

    def node_status(self, status: NodeStatus, now: float) -> list[Action]:
        if self.fleet.on_status(status, now):
            return [NodeDown(status.node, status.session, status.stopped),
                    *self._rescue(status.node, now)]
        view = self.fleet.nodes.get(status.node)
        if not status.online and view is not None and view.status.session == status.session:
            return self._rescue(status.node, now)  # silent first, known dead now: move its work
        return [NodeUp(status)] if status.online else []

    def node_lost(self, node: str, now: float) -> list[Action]:
        """The shell knows ``node`` is gone (its process exited) before its will says so."""
        view = self.fleet.nodes.get(node)
        if view is None:
            return []
        return self.node_status(replace(view.status, online=False), now)

    def node_load(self, report: LoadReport, now: float, retained: bool = False) -> None:
        self.fleet.on_load(report, now, retained)

    def undelivered(self, request_id: str, node: str, now: float) -> list[Action]:
        """The MQTT server had nobody on ``node``'s work topic and dropped the work (a
        restarted server, a site's bridge down): the node is not connected. Nothing ran,
        so the request moves at once, and the node takes no new work until it reports."""
        self.fleet.unreachable(node)
        p = self.tracker.get(request_id)
        if p is None or p.node != node:
            return []
        return self._move(p, UNDELIVERED, f"node {node} was not connected", now)

    def tick(self, now: float) -> list[Action]:
        """Nodes silent too long are lost; requests past deadline + grace are answered.

        A silent node takes no new work, but what it holds is not placed again: silence
        is not death (a cut link, a paused process), and it may yet run that work and
        answer, which a second node running it too would make twice. Each ends by its
        reply or at its deadline, or moves if the node's death is heard (its will)."""
        actions: list[Action] = []
        for node in self.fleet.expire(now):
            actions.append(NodeDown(node, None))
        for p in self.tracker.overdue(now - self.config.reply_grace_ms):
            held = f" from node {p.node}" if p.node else ""
            message = f"no reply within {p.request.budget_ms:.0f} ms{held}"
            actions.append(self._answer(p, ErrorCode.DEADLINE_EXCEEDED, message, now))
        return actions

    def close(self, code: ErrorCode, message: str, now: float) -> list[Action]:
        """Answer every request still held (a broker that stops)."""
        return [self._answer(p, code, message, now) for p in self.tracker]

    # -- transitions ----------------------------------------------------------------------

    def _place(self, p: Pending, now: float, after: ErrorCode | None = None) -> Action:
        """Place ``p``; ``after`` is the refusal of the node it left, if any."""
        r, cfg = p.request, self.config
        ask = Ask(r.model, r.size, p.remaining_ms(now), r.priority, p.tried, r.origin)
        d = place(self.fleet, ask, now, self._rng, policy=cfg.policy, margin=cfg.margin,
                  state=self.placement, tuning=cfg.tuning)
        if p.attempt == 0:  # demand is counted once per request
            wanted = wanted_cloud(d, r.model, cfg.pool_models, self.pool_ready)
            self.demand.request(r.model, r.budget_ms, wanted)
        if d.node is None:
            code = d.code or ErrorCode.INTERNAL
            if after is not None and code == ErrorCode.UNAVAILABLE:
                code = after  # every other node was tried: say why the last one refused
            return self._answer(p, code, d.reason, now, decision=d)
        self.tracker.assign(r.id, d.node, now)
        self.fleet.dispatched(d.node, p.deadline_ms, d.service_ms)
        return Send(p, d.node, p.remaining_ms(now), p.attempt, d)

    def _rescue(self, node: str, now: float) -> list[Action]:
        """Re-place the work of a lost node while its budget allows."""
        actions: list[Action] = []
        for p in self.tracker.on_node(node):
            actions += self._move(p, NODE_LOST, f"node {node} was lost", now)
        return actions

    def _move(self, p: Pending, reason: str, why: str, now: float) -> list[Action]:
        """Take ``p`` from its node and place it again, or end it if its time is up."""
        self._release(p)
        if p.remaining_ms(now) <= 0:
            return [Redispatch(p, reason), self._answer(p, ErrorCode.DEADLINE_EXCEEDED, why, now)]
        return [Redispatch(p, reason), self._place(p, now)]

    def _answer(self, p: Pending, code: ErrorCode, message: str, now: float,
                decision: Decision | None = None) -> Answer:
        self.tracker.complete(p.request.id)
        self._release(p)
        return Answer(p, str(code), message, now - p.accepted_ms, decision=decision)

    def _release(self, p: Pending, network_ms: float | None = None, size: int = 0) -> None:
        """Give the node back the credit ``p`` held (once), learning the link if we can."""
        node = self.tracker.unassign(p)
        if node is not None:
            self.fleet.answered(node, network_ms, size, p.deadline_ms)
