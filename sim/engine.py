"""The discrete-event simulator: a fleet, a broker and a cloud pool on a virtual clock.

    report = Simulation(load_scenario("bursty"), policy="deadline",
                        autoscaler="predictive", seed=1).run()

What is real and what is modelled:

- **Real (imported, not copied):** the broker's request lifecycle (``Dispatcher``:
  placement, re-dispatch after ``OVERLOADED``, rescue of a lost node's work,
  ``DEADLINE_EXCEEDED`` at deadline + grace, the demand the autoscaler reads), its
  fleet view (``Fleet``), the autoscaler (``scale``, fed by ``scale_context``), the
  agent's earliest-deadline-first queue (``WorkQueue``) and service-time estimator
  (``ServiceTime``), and the wire messages the broker learns from (``NodeStatus``,
  ``LoadReport``). The broker sees only what the live one sees: births, deaths (after
  the will's delay), load reports (late by ``report_delay_ms``, every
  ``report_interval_s``), and replies.
- **Modelled:** service time (class mean × a per-request lognormal factor), the
  network (site RTT and bandwidth, no loss), cold starts (lognormal). Each model's
  budget is its SLA. Latency is measured at the broker, from receipt to the reply's
  arrival.

Everything random comes from ``random.Random`` streams seeded from ``seed``, and every
container that decides an order is ordered, so a seed gives one report, byte for byte.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from cloud_broker.autoscaler import AUTOSCALERS, PoolView, ScaleConfig, scale
from cloud_broker.dispatch import (
    Action,
    Answer,
    DispatchConfig,
    Dispatcher,
    Redispatch,
    Reply,
    Send,
)
from cloud_broker.fleet import Fleet
from cloud_broker.placement import Ask, Tuning, fits_anywhere
from cloud_broker.scaling import scale_context
from cloud_broker.tracker import Request
from sim.arrivals import make_process
from sim.nodes import SimNode, SimRequest
from sim.planner import clairvoyant_targets, static_peak_size
from sim.pool import Pool
from sim.report import OK, Recorder
from sim.scenario import Scenario
from skyhop.batching import admit, batch_ms
from skyhop.errors import ProtocolError
from skyhop.protocol.messages import SlaConfig

# Event kinds, in the heap as (time ms, seq, kind, a, b).
(ARRIVE, RECV, DONE, REPLY, LOAD, STATUS, TICK, AUTOSCALE, READY, FAIL, RECOVER,
 SAMPLE, BROKER_LOAD) = range(13)
OVERLOADED, DEADLINE = "OVERLOADED", "DEADLINE_EXCEEDED"
# The simulator knows the future; a live broker does not: ``clairvoyant`` is a benchmark
# yardstick (``planner.clairvoyant_targets``), not one of the broker's ``AUTOSCALERS``.
CLAIRVOYANT = "clairvoyant"
PROGRESS_EVERY = 50_000  # events between progress calls: ~0.1 s of a run
SIM_AUTOSCALERS = (*AUTOSCALERS, CLAIRVOYANT)


class Simulation:
    def __init__(self, scenario: Scenario, *, policy: str = "deadline",
                 autoscaler: str = "predictive", seed: int = 1, margin: float = 0.9,
                 tuning: Tuning | None = None, scaling: dict[str, Any] | None = None) -> None:
        self.s, self.policy, self.seed, self.margin = scenario, policy, seed, margin
        self.tuning = tuning or Tuning()
        net = scenario.network
        streams = ("service", "place", "fleet", "boot", "failures", "origin", "network")
        self.rng = {k: random.Random(f"{seed}/{k}") for k in streams}
        speeds = {e.gpu: e.speed for e in scenario.edges} | {scenario.cloud.gpu:
                                                             scenario.cloud.speed}
        pool_models = frozenset(m.name for m in scenario.models) \
            if scenario.cloud.max_gpus > 0 else frozenset()
        self.dispatcher = Dispatcher(
            Fleet(net.node_timeout_s * 1000, gpu_speed=speeds),
            DispatchConfig(policy=policy, margin=margin, reply_grace_ms=net.reply_grace_ms,
                           tuning=self.tuning, pool_models=pool_models),
            self.rng["place"],
        )
        self.fleet = self.dispatcher.fleet
        # Each model's budget is its SLA, as an operator would have published it.
        self.sla = {m.name: SlaConfig(model=m.name, budget_ms=m.budget_ms, priority=m.priority)
                    for m in scenario.models}
        self.rec = Recorder(scenario)
        self.q: list[tuple[float, int, int, Any, Any]] = []
        self._seq = itertools.count()
        self.now = 0.0
        self.nodes: dict[str, SimNode] = {}
        self.models = {m.name: m for m in scenario.models}
        self._ids = itertools.count(1)
        self.arrived = 0  # requests so far, for progress
        self.open = 0  # requests arrived and not yet answered
        self.pool = Pool(scenario.cloud, self._cloud_node, self.rng["boot"])
        self.scaler = replace(self._scale_config(autoscaler), **(scaling or {}))
        self.scale_state: Any = None
        # The sim-only ``clairvoyant`` autoscaler follows a schedule planned from the future.
        self.schedule = clairvoyant_targets(scenario, margin) if autoscaler == CLAIRVOYANT \
            else None
        self.target = 0
        self.session = 0
        self._frontier: dict[str, list[tuple[float, float]]] = {}
        self._alive: dict[tuple[str, int], int] = {}  # live edges per (class, site)

    # -- set-up ---------------------------------------------------------------------------

    def _scale_config(self, policy: str) -> ScaleConfig:
        c = self.s.cloud
        static = static_peak_size(self.s, self.margin) if policy == "static-peak" else 0
        if policy == CLAIRVOYANT:
            policy = "static-peak"  # the config only paces the calls; the schedule decides
        return ScaleConfig(policy=policy, interval_ms=c.autoscale_interval_s * 1000,
                           min_size=c.min_gpus, max_size=c.max_gpus,
                           scale_to_zero=c.scale_to_zero, price_per_gpu_hour=c.price_per_gpu_hour,
                           cost_cap_per_hour=c.cost_cap_per_hour, margin=self.margin,
                           static_size=static)

    def _serves(self, speed: float) -> tuple[str, ...]:
        return tuple(m.name for m in self.s.models if speed >= m.min_speed)

    def _priors(self, speed: float) -> dict[str, float]:
        return {m.name: m.service_ms / speed for m in self.s.models}

    def _batching(self) -> dict[str, int]:
        return {m.name: m.max_batch for m in self.s.models if m.max_batch > 1}

    def _cloud_node(self, name: str) -> SimNode:
        c = self.s.cloud
        return SimNode(name, "cloud", c.gpu, c.speed, c.concurrency, c.queue_capacity,
                       tuple(self.models), c.rtt_ms, c.bandwidth_mbps, -1,
                       self._priors(c.speed), self._batching())

    def _build_edges(self) -> None:
        net, rng = self.s.network, self.rng["fleet"]
        sites = [(rng.uniform(*net.site_rtt_ms), rng.uniform(*net.site_bandwidth_mbps))
                 for _ in range(net.sites)]
        i = 0
        for e in self.s.edges:
            for _ in range(e.count):
                site = i % net.sites
                node = SimNode(f"edge-{i + 1}", "edge", e.gpu, e.speed, e.concurrency,
                               e.queue_capacity, self._serves(e.speed), sites[site][0],
                               sites[site][1], site, self._priors(e.speed), self._batching())
                self.nodes[node.name] = node
                i += 1

    def _start(self) -> None:
        self._build_edges()
        initial = self.s.cloud.initial_gpus
        if self.schedule is not None:
            initial = self.schedule[0]
        elif self.scaler.policy == "static-peak":
            initial = self.scaler.static_size
        for _ in range(initial):
            node, _ = self.pool.ask(0.0)
            self.pool.became_ready(node.name, 0.0)
            self.pool.cold_starts.clear()  # warm from the start: nothing was measured
            self.nodes[node.name] = node
        self.dispatcher.pool_ready = len(self.pool.ready)
        self.target = initial
        interval = self.s.network.report_interval_s * 1000
        phase = self.rng["fleet"]
        for node in self.nodes.values():
            self._boot(node)
            # The broker starts with every node's birth and a first report, as it would
            # from retained messages; after that each agent reports on its own phase.
            self.fleet.on_status(node.status(True), 0.0)
            self.fleet.on_load(node.load_report(), 0.0)
            self._at(phase.random() * interval, LOAD, node, node.session)
        self._schedule_failures()
        for i, spec in enumerate(self.s.arrivals):
            proc = make_process(spec, random.Random(f"{self.seed}/arrivals/{i}"),
                                self.s.duration_s * 1000, self.s.base_dir)
            self._next_arrival(proc)
        self._at(self.s.network.tick_ms, TICK, None, None)
        self._at(self.scaler.interval_ms, AUTOSCALE, None, None)
        self._at(0.0, SAMPLE, None, None)
        self._build_frontier()

    def _boot(self, node: SimNode) -> None:
        self.session += 1
        node.boot(self.session)

    # -- the loop -------------------------------------------------------------------------

    def _at(self, t: float, kind: int, a: Any, b: Any) -> None:
        heapq.heappush(self.q, (t, next(self._seq), kind, a, b))

    def run(self, progress: Callable[[float, int], None] | None = None) -> dict[str, Any]:
        """Run to the end (every request answered) and return the report. ``progress``
        is called now and then with (simulated seconds, requests so far)."""
        self._start()
        handlers: dict[int, Callable[[Any, Any], None]] = {
            ARRIVE: self._arrive, RECV: self._recv, DONE: self._done, REPLY: self._reply,
            LOAD: self._load, STATUS: self._status, TICK: self._tick,
            AUTOSCALE: self._autoscale, READY: self._ready, FAIL: self._fail,
            RECOVER: self._recover, SAMPLE: self._sample, BROKER_LOAD: self._broker_load}
        end = self.s.duration_s * 1000
        q, pop = self.q, heapq.heappop
        events = 0
        while q:
            t, _, kind, a, b = pop(q)
            if t > end and self.open == 0:
                break  # every request answered, no more arrive: the rest is housekeeping
            self.now = t
            handlers[kind](a, b)
            events += 1
            if progress is not None and events % PROGRESS_EVERY == 0:
                progress(t / 1000, self.arrived)
        self.pool.account(max(self.now, end))
        extra = {"static_pool": self.scaler.static_size, "pool_peak": self.pool.peak,
                 "cloud_cold_start_s": round(self.s.cloud.cold_start_s, 3)}
        name = CLAIRVOYANT if self.schedule is not None else self.scaler.policy
        return self.rec.report(policy=self.policy, autoscaler=name,
                               seed=self.seed, gpu_ms=self.pool.gpu_ms, extra=extra)

    # -- arrivals and the broker ----------------------------------------------------------

    def _next_arrival(self, proc: Any) -> None:
        nxt = proc.next()
        if nxt is not None:
            self._at(nxt[0], ARRIVE, proc, nxt[1])

    def _arrive(self, proc: Any, model_name: str) -> None:
        self._next_arrival(proc)
        m = self.models[model_name]
        factor = _lognormal(self.rng["service"], m.cv)
        origin = str(int(self.rng["origin"].random() * m.streams))
        req = SimRequest(next(self._ids), m.name, self.now, m.budget_ms, m.priority,
                         int(m.request_kb * 1000), int(m.reply_kb * 1000), factor, origin)
        req.feasible = self._feasible(req)
        self.open += 1
        self.arrived += 1
        self.rec.arrival(req)
        request = Request(str(req.id), m.name, req.size, m.budget_ms, m.priority, origin, req)
        self._act(self.dispatcher.accept(request, self.now))

    def _act(self, actions: list[Action]) -> None:
        """What the live broker's shell does with the dispatcher's actions, on our clock."""
        for a in actions:
            if type(a) is Send:
                self._send(a)
            elif type(a) is Answer:
                self._finish(a)
            elif type(a) is Redispatch:
                self.rec.redispatched += 1
            # LateReply, NodeDown and NodeUp are the live broker's log lines and counters.

    def _send(self, a: Send) -> None:
        req: SimRequest = a.pending.request.ref
        node, d = self.nodes[a.node], a.decision
        if a.attempt == 1 and d.cloud_wanted:
            self.rec.wanted_cloud(req)
        req.where = node.role
        self.rec.placed(req, node.role, d.cloud_wanted, d.pulled_back)
        self._at(self.now + self._transit(node, req.size), RECV, req,
                 (node, node.session, a.remaining_ms))

    def _finish(self, a: Answer) -> None:
        req: SimRequest = a.pending.request.ref
        d = a.decision
        if d is not None:  # placement refused it
            if a.pending.attempt == 0 and d.cloud_wanted:
                self.rec.wanted_cloud(req)  # refused at its first placement
            self._audit_refusal(a)
        if a.where:
            req.where = a.where  # the node that answered (it may not be the last one sent)
        self.open -= 1
        self.rec.terminal(req, a.code, a.latency_ms)

    def _audit_refusal(self, a: Answer) -> None:
        """Count the refusal, and whether a node in the broker's view could have met it."""
        p = a.pending
        r = p.request
        ask = Ask(r.model, r.size, p.remaining_ms(self.now), r.priority, p.tried, r.origin)
        self.rec.refusal(a.code, fits_anywhere(self.fleet, ask, self.now, self.margin,
                                               self.tuning))

    def _reply(self, req: SimRequest, info: tuple[str, str, float, float]) -> None:
        node_name, code, queue_ms, service_ms = info
        reply = Reply(str(req.id), code, node_name, self.nodes[node_name].role, queue_ms,
                      service_ms, req.reply_size)
        self._act(self.dispatcher.reply(reply, self.now))

    def _tick(self, _a: Any, _b: Any) -> None:
        self._act(self.dispatcher.tick(self.now))
        self._at(self.now + self.s.network.tick_ms, TICK, None, None)

    def _status(self, node: SimNode, status: Any) -> None:
        self._act(self.dispatcher.node_status(status, self.now))

    def _broker_load(self, report: Any, _b: Any) -> None:
        self.dispatcher.node_load(report, self.now)

    # -- nodes ----------------------------------------------------------------------------

    def _recv(self, req: SimRequest, where: tuple[SimNode, int, float]) -> None:
        node, session, remaining = where  # remaining: WorkMeta.remaining_ms at dispatch
        if not node.up or node.session != session or node.retiring:
            return  # lost with the node: the broker rescues it when it learns
        try:
            node.queue.push(str(req.id), self.now + remaining, self.now, req, req.priority)
        except ProtocolError:  # OVERLOADED: the queue is full
            self._send_reply(node, req, OVERLOADED, 0.0, 0.0)
            return
        self._run_next(node)

    def _run_next(self, node: SimNode) -> None:
        while node.busy < node.concurrency:
            job, expired = node.queue.pop(self.now)
            for late in expired:
                self._send_reply(node, late.payload, DEADLINE, 0.0, 0.0)
            if job is None:
                return
            jobs = self._batch(node, job)
            reqs: list[SimRequest] = [j.payload for j in jobs]
            node.busy += 1
            node.running += len(reqs)
            m = self.models[reqs[0].model]
            # A batch runs as its first request does, plus batch_cost of that for each
            # other: the lognormal factor is the node's state, drawn per request.
            alone = m.service_ms / node.speed * reqs[0].factor
            service = alone * (1 + m.batch_cost * (len(reqs) - 1))
            queued = [self.now - j.received for j in jobs]
            self._at(self.now + service, DONE, (node, node.session), (reqs, queued, service))

    def _batch(self, node: SimNode, head: Any) -> list[Any]:
        """``head`` and the queued requests that run with it: the agent's rule
        (``WorkQueue.take``, ``skyhop.batching.admit``) over the node's learnt curve."""
        model = head.payload.model
        limit = node.batching.get(model, 1)
        if limit <= 1:
            return [head]
        more, expired = node.queue.take(self.now, lambda j: j.payload.model == model,
                                        limit - 1)
        for late in expired:
            self._send_reply(node, late.payload, DEADLINE, 0.0, 0.0)
        jobs = [head, *more]
        points = node.curve(model)
        n = admit(self.now, [(j.deadline, 1) for j in jobs],
                  lambda k: batch_ms(points, k), limit)
        node.queue.put_back(jobs[n:])
        return jobs[:n]

    def _done(self, where: tuple[SimNode, int],
              job: tuple[list[SimRequest], list[float], float]) -> None:
        node, session = where
        if node.session != session or not node.up:
            return  # the node crashed while running it
        reqs, queued, service = job
        node.busy -= 1
        node.running -= len(reqs)
        model = reqs[0].model
        if len(reqs) == 1:
            node.service[model].observe(service)
        if model in node.batch_times:
            node.batch_times[model].observe(len(reqs), service)
        for req, waited in zip(reqs, queued, strict=True):
            self._send_reply(node, req, OK, waited, service)
        if node.retiring:
            self._retire_step(node)
        else:
            self._run_next(node)

    def _send_reply(self, node: SimNode, req: SimRequest, code: str, queue_ms: float,
                    service_ms: float) -> None:
        delay = self._transit(node, req.reply_size)
        self._at(self.now + delay, REPLY, req, (node.name, code, queue_ms, service_ms))

    def _transit(self, node: SimNode, size: int) -> float:
        """One message's trip: half the round trip, the transfer, and the site's jitter."""
        jitter = self.s.network.jitter_ms
        extra = self.rng["network"].expovariate(1 / jitter) if jitter > 0 else 0.0
        return node.one_way_ms(size) + extra

    def _load(self, node: SimNode, session: int) -> None:
        if not node.up or node.session != session or node.retiring:
            return
        self._at(self.now + self.s.network.report_delay_ms, BROKER_LOAD, node.load_report(), None)
        self._at(self.now + self.s.network.report_interval_s * 1000, LOAD, node, session)

    # -- failures -------------------------------------------------------------------------

    def _schedule_failures(self) -> None:
        edges = [n for n in self.nodes.values() if n.role == "edge"]
        rng = self.rng["failures"]
        for f in self.s.failures:
            pool = [n for n in edges if f.gpu in (None, n.gpu)]
            if f.sites:
                hit = [n for n in pool if n.site in f.sites]
            else:
                hit = rng.sample(pool, round(f.fraction * len(pool)))
            for node in hit:
                self._at(f.at_s * 1000, FAIL, node, None)
                if f.duration_s:
                    self._at((f.at_s + f.duration_s) * 1000, RECOVER, node, None)
        rf = self.s.random_failures
        if rf is not None:
            for node in edges:
                t = 0.0
                while True:
                    t += rng.expovariate(1 / rf.mtbf_s) * 1000
                    if t >= self.s.duration_s * 1000:
                        break
                    self._at(t, FAIL, node, None)
                    t += rng.expovariate(1 / rf.mttr_s) * 1000
                    self._at(t, RECOVER, node, None)

    def _fail(self, node: SimNode, _b: Any) -> None:
        if not node.up:
            return
        node.up = False  # queued and running work is lost with the process
        self._alive_change(node, -1)
        self._at(self.now + self.s.network.death_notice_s * 1000, STATUS, node, node.status(False))

    def _recover(self, node: SimNode, _b: Any) -> None:
        if node.up:
            return
        self._boot(node)
        self._alive_change(node, +1)
        self._at(self.now + self.s.network.report_delay_ms, STATUS, node, node.status(True))
        self._at(self.now + self.s.network.report_interval_s * 1000, LOAD, node, node.session)

    # -- the cloud pool -------------------------------------------------------------------

    def _autoscale(self, _a: Any, _b: Any) -> None:
        counts = self.dispatcher.demand.take(self.models)  # zeroed for the next call either way
        if self.schedule is not None:
            target = self.schedule[min(int(self.now // 1000), len(self.schedule) - 1)]
        else:
            ctx = scale_context(self.now, counts, self.fleet, self.sla, self._pool_view(),
                                self.scaler)
            target, self.scale_state = scale(ctx, self.scale_state)
        if target != self.target:
            self.rec.scale_events += 1
            self.target = target
        self._resize(target)
        self._at(self.now + self.scaler.interval_ms, AUTOSCALE, None, None)

    def _pool_view(self) -> PoolView:
        return PoolView(ready=len(self.pool.ready), starting=len(self.pool.booting),
                        slots=self.s.cloud.concurrency, ongoing=self.pool.ongoing(),
                        cold_starts_ms=self.pool.take_cold_starts())

    def _resize(self, target: int) -> None:
        for _ in range(target - self.pool.size):
            node, ready_at = self.pool.ask(self.now)
            self.nodes[node.name] = node
            self._at(ready_at, READY, node, None)
        if target < self.pool.size:
            for node in self.pool.shrink(self.pool.size - target, self.now):
                self._at(self.now + self.s.network.report_delay_ms, STATUS, node,
                         node.status(False))
                node.queue = type(node.queue)(node.capacity)  # queued work is rescued
                self._retire_step(node)
        self.dispatcher.pool_ready = len(self.pool.ready)

    def _retire_step(self, node: SimNode) -> None:
        if node.busy == 0:
            node.up = False
            self.pool.stopped(node.name, self.now)

    def _ready(self, node: SimNode, _b: Any) -> None:
        if self.pool.became_ready(node.name, self.now) is None:
            return  # cancelled while it booted
        self.dispatcher.pool_ready = len(self.pool.ready)
        self._boot(node)
        self._at(self.now + self.s.network.report_delay_ms, STATUS, node, node.status(True))
        report = node.load_report()  # an agent's first report follows its birth
        self._at(self.now + self.s.network.report_delay_ms, BROKER_LOAD, report, None)
        self._at(self.now + self.s.network.report_interval_s * 1000, LOAD, node, node.session)

    def _sample(self, _a: Any, _b: Any) -> None:
        self.rec.sample(len(self.pool.ready), len(self.pool.booting), self.target)
        nxt = self.now + self.rec.step_ms
        if nxt < self.s.duration_s * 1000:
            self._at(nxt, SAMPLE, None, None)

    # -- the feasible upper bound ---------------------------------------------------------

    def _build_frontier(self) -> None:
        """Per model, the Pareto front of (network, service) over live (class, site)
        groups that serve it, and the cloud if the pool may have a worker.

        ``feasible`` asks: alone on the fastest node that can reach it, would the request
        fit its budget? With a per-request service factor, only the front can answer yes.
        """
        if not self._alive:
            for n in self.nodes.values():
                if n.role == "edge" and n.up:
                    self._alive[(n.gpu, n.site)] = self._alive.get((n.gpu, n.site), 0) + 1
        reps: dict[tuple[str, int], SimNode] = {}
        for n in self.nodes.values():
            if n.role == "edge" and self._alive.get((n.gpu, n.site)):
                reps.setdefault((n.gpu, n.site), n)
        cloud = self._cloud_node("cloud-probe") if self.s.cloud.max_gpus > 0 else None
        for m in self.s.models:
            size, reply = int(m.request_kb * 1000), int(m.reply_kb * 1000)
            rows = [(n.one_way_ms(size) + n.one_way_ms(reply), m.service_ms / n.speed)
                    for n in [*reps.values(), *([cloud] if cloud else [])]
                    if m.name in n.models]
            front: list[tuple[float, float]] = []
            for network, service in sorted(rows):
                if not front or service < front[-1][1]:
                    front.append((network, service))
            self._frontier[m.name] = front

    def _alive_change(self, node: SimNode, delta: int) -> None:
        key = (node.gpu, node.site)
        before = self._alive.get(key, 0)
        self._alive[key] = before + delta
        if (before == 0) != (before + delta == 0):
            self._build_frontier()  # a (class, site) group appeared or vanished

    def _feasible(self, req: SimRequest) -> bool:
        budget, factor = req.budget, req.factor
        return any(network + service * factor <= budget
                   for network, service in self._frontier[req.model])


def _lognormal(rng: random.Random, cv: float) -> float:
    """A factor with mean 1 and coefficient of variation ``cv``."""
    if cv <= 0:
        return 1.0
    sigma = math.sqrt(math.log(1 + cv * cv))
    return math.exp(rng.gauss(-sigma * sigma / 2, sigma))


def simulate(scenario: Scenario, *, policy: str = "deadline", autoscaler: str = "predictive",
             seed: int = 1, progress: Callable[[float, int], None] | None = None,
             **kwargs: Any) -> dict[str, Any]:
    """Run one scenario and return its report (see docs/simulator.md §Report)."""
    return Simulation(scenario, policy=policy, autoscaler=autoscaler, seed=seed,
                      **kwargs).run(progress)
