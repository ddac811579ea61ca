"""The orchestrator's shell: MQTT messages in, the dispatcher's actions out.

The request lifecycle itself is ``dispatch.Dispatcher`` (pure, shared with the
simulator); this file reads messages, checks what only a shell can (the replay window,
the client's rate, the broker stopping), and turns the dispatcher's actions into
publishes, metrics and log lines. One lock guards the pure core (dispatcher, replay
guard); paho's network thread and one ticker thread take it for microseconds per
event. Replies from nodes come back through the broker (``broker/{id}/replies``) rather
than straight to clients, so that the dispatcher sees every completion: that is what
lets it re-dispatch the work of a dead node and still answer each request exactly once.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import logging
import math
import queue
import random
import threading
import time
import uuid
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cloud_broker.autoscaler import ScaleContext, ScaleState, scale
from cloud_broker.broker_metrics import CATALOG, NAMESPACE, POOL_GAUGES, bind_nodes
from cloud_broker.config import BrokerConfig, scale_config
from cloud_broker.dispatch import (
    Action,
    Answer,
    DispatchConfig,
    Dispatcher,
    LateReply,
    NodeDown,
    NodeUp,
    Redispatch,
    Reply,
    Send,
)
from cloud_broker.fleet import Fleet, NodeView
from cloud_broker.outcomes import Outcome, Outcomes
from cloud_broker.pool import PoolBackend, Worker, plan
from cloud_broker.ratelimit import RateLimiter
from cloud_broker.scaling import reason, scale_context
from cloud_broker.tracker import Request
from skyhop import audit
from skyhop.errors import ErrorCode, ProtocolError, TransportError
from skyhop.logs import fields
from skyhop.logthrottle import LogThrottle
from skyhop.metrics import Metrics
from skyhop.mqtt.bus import Bus
from skyhop.mqtt.message import Handler, Message, Will
from skyhop.mqtt.url import TlsFiles
from skyhop.protocol.age import Ages
from skyhop.protocol.envelope import error_reply, peek_reply, peek_request
from skyhop.protocol.messages import (
    ANNOUNCE,
    CLOCK,
    DRAIN,
    LoadReport,
    NodeStatus,
    ReplyHeader,
    RequestHeader,
    WorkMeta,
    packb,
)
from skyhop.protocol.replay import ReplayGuard
from skyhop.protocol.topics import BROKERS_GROUP, Topics
from skyhop.security.sla import Rejected, SlaBook
from skyhop.stats import percentile

log = logging.getLogger("skyhop.broker")
TICK_S = 0.02
HISTORY_S, HISTORY_BUCKET_S = 600.0, 5.0  # what /status and the page chart
SCRAPE_CACHE_MS = 500.0  # one scrape reads the fleet once, not once per gauge


ASK_BIRTH_EVERY_MS = 5_000.0
ANSWERED_KEPT = 10_000  # recent replies kept to answer a request sent again
# A reply younger than this is taken to be still on its way to a client that asks
# again (it asked on hearing a broker die): not sent twice. One older was lost.
REPLY_IN_FLIGHT_MS = 500.0
# A request is stale (DEADLINE_EXCEEDED, never placed) once it waited its whole budget
# and at least this long on its way: held in a queue, not merely a busy machine's jitter.
STALE_MIN_MS = 250.0
MIN_BUDGET_MS = 0.001  # what is left to place by, at least


def _now_ms() -> float:
    return time.monotonic() * 1000


FLUSH_S = 5.0  # at stop, how long the last replies may take to reach the MQTT server


@dataclass(frozen=True, slots=True)
class Route:
    """``Request.ref`` at the live broker: what it forwards, and where the answer goes."""

    envelope: bytes
    reply_topic: str
    correlation: bytes | None


class Broker:
    def __init__(
        self,
        mqtt_url: str,
        *,
        config: BrokerConfig | None = None,
        topics: Topics | None = None,
        broker_id: str | None = None,
        seed: int | None = None,
        tls: TlsFiles | None = None,
        pool: PoolBackend | None = None,
        slas: SlaBook | None = None,
        audit: Path | None = None,
    ) -> None:
        """``slas``: which SLAs to apply (default: unsigned ones, as with no fleet CA).
        ``audit``: the trail to record applied SLAs and scale decisions in."""
        self.config = config or BrokerConfig()
        self.topics = topics or Topics()
        self.broker_id = broker_id or f"broker-{uuid.uuid4().hex[:8]}"
        pool_models = frozenset(pool.models) if pool is not None else frozenset()
        self.dispatcher = Dispatcher(
            Fleet(self.config.node_timeout_s * 1000),
            DispatchConfig(policy=self.config.policy, margin=self.config.margin,
                           reply_grace_ms=self.config.reply_grace_ms, pool_models=pool_models),
            random.Random(seed),
        )
        self.fleet = self.dispatcher.fleet
        self.replay = ReplayGuard(self.config.replay_window_s * 1000)
        self.ages = Ages()  # how long each client's requests waited before reaching us
        self._asked_birth: dict[str, float] = {}  # node -> when we last asked (_ask_birth)
        # id -> (when, its reply): the last ANSWERED_KEPT, for a client that asks again
        self._answered: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self.clock = uuid.uuid4().hex[:12]  # names _now_ms()'s clock to the agents
        self._log_throttle = LogThrottle()
        self.limiter = (RateLimiter(self.config.client_rate, self.config.client_burst)
                        if self.config.client_rate > 0 else None)
        # A node's status and load beyond its rate are dropped before they are decoded:
        # this bounds the broker's work on one chatty or flapping node and names it. It
        # cannot stop a flood on the wire (docs/security.md, Known gaps).
        self.node_limiter = (RateLimiter(self.config.node_rate, self.config.node_burst,
                                         max_clients=100_000)
                             if self.config.node_rate > 0 else None)
        self.slas = slas or SlaBook(None)
        self.sla = self.slas.current  # what placement and the autoscaler read
        self.audit_path = audit
        self.metrics = Metrics(NAMESPACE, CATALOG)
        self.metrics.read("pending_requests", lambda: len(self.dispatcher))
        self.metrics.read("live_nodes", self._live_count)
        bind_nodes(self.metrics, self._scraped_nodes)
        self._scrape: tuple[float, list[dict[str, Any]]] = (-math.inf, [])
        self.where: Counter[str] = Counter()
        self.latencies: deque[float] = deque(maxlen=10_000)
        self.outcomes = Outcomes(HISTORY_BUCKET_S, HISTORY_S)
        # (time s, target, ready, starting) every bucket: the page's pool chart
        self.pool_history: deque[tuple[float, int, int, int]] = deque(
            maxlen=round(HISTORY_S / HISTORY_BUCKET_S))
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._closed = False  # drained: a request now is refused, not taken
        self._ticker: threading.Thread | None = None
        # (request id, node) of work the MQTT server had nobody to give to (PUBACK 0x10)
        self._undelivered: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        # Sent by the MQTT server only if this process dies: clients then send again
        # what they still wait for (ADR 0010). Not retained: only the living care.
        self.bus = Bus(mqtt_url, self.broker_id, tls=tls,
                       will=Will(self.topics.broker_lost(self.broker_id), b"", qos=1,
                                 retain=False), on_connect=self._on_connect)
        # The cloud pool, when this broker sizes one (docs/architecture.md).
        self.pool = pool
        self.scaling = scale_config(self.config.autoscale, self.config.margin)
        self._scale_state: ScaleState | None = None
        self._next_scale_ms = 0.0  # the first call sizes the pool at once (min_size)
        # What the pool gauges read: scrapes come from another thread, so they read
        # these numbers, refreshed by the ticker, rather than the pool itself.
        self.pool_gauges = dict.fromkeys(POOL_GAUGES, 0.0)
        if pool is not None:
            for name in self.pool_gauges:
                self.metrics.read(f"pool_{name}",
                                  functools.partial(self.pool_gauges.__getitem__, name))
            # Known before any worker is up: a request for them is UNAVAILABLE (the pool
            # will serve it), not UNKNOWN_MODEL.
            self.fleet.known_models.update(pool.models)

    # -- lifecycle ----------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        t = self.topics
        self.bus.subscribe(t.status_all, self._limit(self._guard(self._on_status, "status")),
                           qos=1)
        self.bus.subscribe(t.load_all, self._limit(self._guard(self._on_load, "load")), qos=0)
        self.bus.subscribe(t.sla_all, self._guard(self._on_sla, "sla"), qos=1)
        self.bus.subscribe(t.broker_replies(self.broker_id), self._guard(self._on_reply, "reply"),
                           qos=1)
        self.bus.subscribe(t.req_shared(BROKERS_GROUP), self._guard(self._on_request, "request"),
                           qos=1)
        self.bus.start(timeout=timeout)
        self._ticker = threading.Thread(target=self._tick_loop, name="skyhop-ticker", daemon=True)
        self._ticker.start()
        log.info("broker %s up: policy=%s prefix=%s", self.broker_id, self.config.policy, t.prefix)

    def stop(self) -> None:
        """Leave without losing what was accepted: see ``drain``."""
        self.drain(self.config.drain_s)
        self._stopping.set()
        if self._ticker:
            self._ticker.join(timeout=5)
        if not self.bus.flush(FLUSH_S):
            log.warning("stopping with replies the MQTT server has not acknowledged")
        self.bus.stop()
        if self.pool is not None:
            self.pool.close()  # after the bus: no handler can touch the pool any more
        log.info("broker %s stopped", self.broker_id)

    def ready(self) -> bool:
        """``/readyz``: connected, subscribed (the server sends the nodes' retained
        statuses at subscribe: the fleet view) and not stopping."""
        return self.bus.connected and self._ticker is not None and not self._closed

    def drain(self, timeout_s: float) -> None:
        """Take no new requests; wait up to ``timeout_s`` for the replies to those taken
        (the ticker still answers deadlines and re-dispatches); answer what is left
        UNAVAILABLE, so that a rolling restart ends every request with one reply.

        Leaving the shared subscription hands new requests to the group's other
        brokers. One this broker was sent before that, and takes after the last answer,
        is refused UNAVAILABLE at once (``_on_request``).
        """
        self.bus.unsubscribe(self.topics.req_shared(BROKERS_GROUP))
        with self._lock:
            pending = len(self.dispatcher)
        log.info("draining: taking no new requests; %d in flight, waiting up to %.0f s",
                 pending, timeout_s)
        end = time.monotonic() + timeout_s
        while time.monotonic() < end and len(self.dispatcher):
            time.sleep(0.05)
        with self._lock:
            self._closed = True
            left = self.dispatcher.close(ErrorCode.UNAVAILABLE,
                                         "the broker stopped before a reply; retry", _now_ms())
            self._act(left)
        if left:
            self.metrics.inc("drain_unanswered_total", len(left))
            log.warning("stopped with %d request(s) unanswered: answered UNAVAILABLE", len(left))

    def _guard(self, handler: Handler, kind: str) -> Handler:
        """Run a handler under the lock; a bug costs one message, never the thread.

        A message that breaks the protocol is bad input from a peer, not a bug here: it
        is counted (``bad_messages_total{kind}``) and logged in one line, at most once a
        minute per kind, so a broken or hostile node cannot flood the log."""

        def run(msg: Message) -> None:
            with self._lock:
                try:
                    handler(msg)
                except ProtocolError as exc:
                    self.metrics.inc("bad_messages_total", kind=kind)
                    self._warn(kind, "dropped a bad %s message on %s: %s", kind, msg.topic, exc)
                except Exception:
                    self.metrics.inc("handler_errors_total")
                    log.exception("handler failed on %s", msg.topic)

        return run

    def _limit(self, handler: Handler) -> Handler:
        """Drop a node's message beyond ``[broker] node_rate`` before any work is done
        on it (no lock, no decoding): counted in ``node_messages_limited_total``, and
        logged once a minute. The network thread alone calls it: no lock needed."""
        limiter = self.node_limiter
        if limiter is None:
            return handler

        def run(msg: Message) -> None:
            node = self.topics.node_of(msg.topic) or ""
            if limiter.allow(node, _now_ms()):
                handler(msg)
                return
            self.metrics.inc("node_messages_limited_total")
            self._warn("node_rate", "node %s sends status and load faster than node_rate "
                       "(%g/s, burst %g): dropped the excess", node, self.config.node_rate,
                       self.config.node_burst)

        return run

    def _warn(self, key: str, fmt: str, *args: object) -> None:
        """A warning that repeats is logged once a minute per ``key``, with a count."""
        held = self._log_throttle.admit(key, _now_ms())
        if held is not None:
            log.warning(fmt + "%s", *args, LogThrottle.suffix(held))

    # -- requests -----------------------------------------------------------------------

    def _on_request(self, msg: Message) -> None:
        now = _now_ms()
        self.metrics.inc("requests_received_total")
        try:
            header = peek_request(msg.payload)
        except ProtocolError as exc:
            self._refuse(msg.response_topic, msg.correlation, "", exc.code, exc.message)
            return
        reply_topic = msg.response_topic or header.reply
        if self.dispatcher.holds(header.id) or self.replay.seen(header.id):
            # A QoS 1 redelivery, or a client sending again after a broker died or its
            # connection dropped (ADR 0010): the first copy answers here, or did; its
            # reply may have been lost with a restarted MQTT server, so send it again.
            self.metrics.inc("duplicates_total")
            at, answered = self._answered.get(header.id, (now, b""))
            if answered and reply_topic and now - at >= REPLY_IN_FLIGHT_MS:
                self.metrics.inc("replies_resent_total")
                self.bus.publish(reply_topic, answered, qos=1, correlation=msg.correlation)
            return
        try:
            if self.topics.model_of(msg.topic) != header.model:
                raise ProtocolError(
                    ErrorCode.BAD_REQUEST,
                    f"topic {msg.topic} does not match header model {header.model}",
                )
            self._check_rate(reply_topic, now)
            self.replay.check(header.id, header.sent_at_ms, time.time() * 1000, header.budget_ms)
        except ProtocolError as exc:
            self._refuse(reply_topic, msg.correlation, header.id, exc.code, exc.message)
            return
        if self._closed:
            self._refuse(reply_topic, msg.correlation, header.id, ErrorCode.UNAVAILABLE,
                         "this broker is stopping; retry")
            return
        # Time it sat in the client library's or the MQTT server's queue counts: a
        # request whose budget ran out on the way is never run (skyhop.protocol.age).
        waited = self.ages.age_ms(reply_topic or "", header.sent_at_ms, now)
        budget = self._budget(header)
        if waited >= max(budget, STALE_MIN_MS):
            self.metrics.inc("stale_total", stage="broker")
            self._refuse(reply_topic, msg.correlation, header.id, ErrorCode.DEADLINE_EXCEEDED,
                         f"it waited {waited:.0f} ms before reaching the broker (a client's "
                         "or the MQTT server's queue), past its budget; never run")
            return
        # A shorter wait past a tiny budget is left to placement: INFEASIBLE says more.
        budget = max(budget - waited, MIN_BUDGET_MS)
        route = Route(msg.payload, reply_topic, msg.correlation)
        # One client's requests are one stream (placement's hysteresis): origin = its topic.
        request = Request(header.id, header.model, header.size, budget,
                          header.priority, origin=reply_topic, ref=route)
        self.metrics.inc("requests_accepted_total", model=header.model)
        self._act(self.dispatcher.accept(request, now))

    def _budget(self, header: RequestHeader) -> float:
        """A request's budget, capped at its model's SLA: the SLA is the operator's
        bound on what one request may ask of the fleet (docs/operations.md §SLAs)."""
        sla = self.sla.get(header.model)
        if sla is None or header.budget_ms <= sla.budget_ms:
            return header.budget_ms
        self.metrics.inc("budget_capped_total", model=header.model)
        return sla.budget_ms

    def _check_rate(self, client: str | None, now: float) -> None:
        """Before the replay guard, so that a refused request may be sent again."""
        if self.limiter is not None and not self.limiter.allow(client or "", now):
            raise ProtocolError(
                ErrorCode.OVERLOADED,
                f"this client sent more than {self.config.client_rate:g} requests/s "
                f"(burst {self.config.client_burst:g}); slow down and retry",
            )

    # -- replies ------------------------------------------------------------------------

    def _on_reply(self, msg: Message) -> None:
        header = peek_reply(msg.payload)
        request_id = msg.correlation.decode() if msg.correlation else header.id
        reply = Reply(request_id, header.status, header.node, header.where, header.queue_ms,
                      header.service_ms, len(msg.payload))
        self._act(self.dispatcher.reply(reply, _now_ms()), msg.payload)

    # -- actions ------------------------------------------------------------------------

    def _act(self, actions: list[Action], payload: bytes = b"") -> None:
        """Carry out the dispatcher's actions; ``payload`` is the node reply being read."""
        for a in actions:
            match a:
                case Send():
                    self._send(a)
                case Answer():
                    self._answer(a, payload)
                case Redispatch(reason=why):
                    self.metrics.inc("redispatched_total", reason=why)
                case LateReply():
                    self.metrics.inc("late_replies_total")  # answered already
                case NodeDown():
                    self._node_down(a)
                case NodeUp(status=status):
                    log.info("node %s online: role=%s models=%s", status.node, status.role,
                             ",".join(status.models), extra=fields(node=status.node))
                    self._send_clock(status.node)
                    if self.pool is not None:
                        self._pool_born(status.node)

    def _on_connect(self) -> None:
        """After every (re)connect: the nodes' silence while we were away is ours."""
        with self._lock:
            self.dispatcher.fleet.listening(_now_ms())

    def _send_clock(self, node: str) -> None:
        """Our clock's stamp, before any work: the node learns how quickly our messages
        arrive, so even the first work that waited on its way is seen stale."""
        meta = WorkMeta(0.0, sent_ms=_now_ms(), clock=self.clock)
        with contextlib.suppress(TransportError):  # a sample only: work stamps carry on
            self.bus.publish(self.topics.work(node), b"", qos=1,
                             response_topic=self.topics.broker_replies(self.broker_id),
                             user_properties=(CLOCK, *meta.properties()))

    def _send(self, a: Send) -> None:
        p, route = a.pending, a.pending.request.ref
        self.bus.publish(
            self.topics.work(a.node),
            route.envelope,
            qos=1,
            response_topic=self.topics.broker_replies(self.broker_id),
            correlation=p.request.id.encode(),
            user_properties=tuple(WorkMeta(a.remaining_ms, a.attempt, sent_ms=_now_ms(),
                                           clock=self.clock).properties()),
            expiry_s=max(1, math.ceil(a.remaining_ms / 1000)),
            # On the network thread, or this one under the lock: the ticker takes it.
            on_unheard=functools.partial(self._undelivered.put, (p.request.id, a.node)),
        )
        log.debug(
            "request %s -> %s (attempt %d, predicted %.1f ms, %.1f ms left)",
            p.request.id,
            a.node,
            a.attempt,
            a.decision.predicted_ms,
            a.remaining_ms,
        )

    def _answer(self, a: Answer, payload: bytes) -> None:
        """The request's one reply: the node's reply bytes unchanged, or our error."""
        request, route = a.pending.request, a.pending.request.ref
        if not a.forward:
            log.info("request %s (%s) answered %s: %s", request.id, request.model, a.code,
                     a.message, extra=fields(request_id=request.id, model=request.model,
                                             code=a.code))
            payload = error_reply(ReplyHeader(id=request.id, status=a.code, message=a.message))
        self.bus.publish(route.reply_topic, payload, qos=1, correlation=route.correlation)
        self._answered[request.id] = (_now_ms(), payload)  # for one asking again (ADR 0010)
        if len(self._answered) > ANSWERED_KEPT:
            self._answered.popitem(last=False)
        self._count(a)

    def _count(self, a: Answer) -> None:
        request, where = a.pending.request, a.where or "none"
        outcome = Outcome(request.model, a.code, a.latency_ms, request.budget_ms, a.where)
        m = self.metrics
        m.inc("replies_total", code=a.code, where=where)
        m.inc("slo_met_total" if outcome.met else "slo_missed_total", model=request.model)
        m.observe("request_latency_seconds", a.latency_ms / 1000, model=request.model,
                  where=where)
        if a.reply is not None and a.reply.ok:
            m.observe("queue_wait_seconds", a.reply.queue_ms / 1000, model=request.model,
                      where=where)
            m.observe("service_seconds", a.reply.service_ms / 1000, model=request.model,
                      where=where)
        if a.where:
            self.where[a.where] += 1
        self.latencies.append(a.latency_ms)
        self.outcomes.record(time.time(), outcome, a.message)

    def _node_down(self, a: NodeDown) -> None:
        if a.session is None:
            held = len(self.dispatcher.tracker.on_node(a.node))
            log.warning("node %s silent for %.1f s: offline, no new work; the %d request(s) "
                        "it holds end by its reply or at their deadline", a.node,
                        self.config.node_timeout_s, held, extra=fields(node=a.node))
            return
        stopped = self.pool is not None and a.node in self.pool.stopping()
        if self.pool is not None and stopped:
            self.pool.left(a.node, _now_ms())
        if stopped or a.stopped:  # a scale-down or a clean stop is no alarm
            log.info("node %s stopped (session %d)", a.node, a.session,
                     extra=fields(node=a.node))
        else:
            log.warning("node %s lost its connection (session %d): offline", a.node, a.session,
                        extra=fields(node=a.node))

    def _refuse(
        self,
        topic: str | None,
        correlation: bytes | None,
        request_id: str,
        code: ErrorCode,
        message: str,
    ) -> None:
        """Answer a request that was never accepted (bad input)."""
        self.metrics.inc("refused_total", code=code)
        log.info("request %s refused %s: %s", request_id or "?", code, message,
                 extra=fields(request_id=request_id or None, code=code))
        if topic:
            reply = error_reply(ReplyHeader(id=request_id, status=code, message=message))
            self.bus.publish(topic, reply, qos=1, correlation=correlation)

    # -- fleet --------------------------------------------------------------------------

    def _on_status(self, msg: Message) -> None:
        if not msg.payload:
            return  # a cleared retained status
        status = NodeStatus.decode(msg.payload)
        if not self._from_its_node(msg, status.node):
            return
        self._act(self.dispatcher.node_status(status, _now_ms()))

    def _on_load(self, msg: Message) -> None:
        if msg.payload:
            load = LoadReport.decode(msg.payload)
            if self._from_its_node(msg, load.node):
                now = _now_ms()
                self.dispatcher.node_load(load, now, retained=msg.retain)
                view = self.fleet.nodes.get(load.node)
                if view is None or view.status.session < load.session:
                    self._ask_birth(load.node, now)

    def _ask_birth(self, node: str, now: float) -> None:
        """Load proves a node runs, but without its status (garbage, or nothing, retained
        on its status topic) it cannot be placed on: ask it to announce itself again."""
        if now - self._asked_birth.get(node, -math.inf) < ASK_BIRTH_EVERY_MS:
            return
        if len(self._asked_birth) > 100_000:
            self._asked_birth.clear()
        self._asked_birth[node] = now
        self.metrics.inc("births_asked_total")
        self._warn(f"birth-{node}", "node %s sends load but its status is unknown: asked "
                   "it to announce itself", node)
        self.bus.publish(self.topics.work(node), b"", qos=1, user_properties=(ANNOUNCE,))

    def _from_its_node(self, msg: Message, node: str) -> bool:
        """The ACL binds a node to its own topics, not to what its payload claims."""
        if self.topics.node_of(msg.topic) == node:
            return True
        self.metrics.inc("spoofed_node_messages_total")
        self._warn("spoofed", "dropped a message on %s that claims to be from node %s",
                   msg.topic, node)
        return False

    def _on_sla(self, msg: Message) -> None:
        """Apply an SLA the fleet CA vouches for (skyhop.security.sla); count the rest."""
        try:
            change = self.slas.offer(self.topics.model_of(msg.topic), msg.payload,
                                     dt.datetime.now(dt.timezone.utc))
        except Rejected as exc:
            self.metrics.inc("sla_rejected_total", reason=exc.reason)
            self._warn(f"sla-{exc.reason}", "ignored the SLA on %s: %s", msg.topic, exc.message)
            return
        if change is None:
            return
        if change.sla is None:
            log.info("SLA for %s cleared by %s", change.model, change.signer,
                     extra=fields(model=change.model))
            self._audit(change.signer, "sla.cleared", {"model": change.model})
            return
        self.fleet.known_models.add(change.model)
        log.info("SLA for %s: %g ms, priority %d (signed by %s)", change.model,
                 change.sla.budget_ms, change.sla.priority, change.signer,
                 extra=fields(model=change.model))
        self._audit(change.signer, "sla.applied", {"model": change.model,
                                               "budget_ms": change.sla.budget_ms,
                                               "priority": change.sla.priority})

    def _audit(self, signer: str, action: str, changed: dict[str, Any]) -> None:
        """Record in the trail as this broker, naming who asked (``by``)."""
        if self.audit_path is None:
            return
        try:
            audit.record(self.audit_path, self.broker_id, action, {**changed, "by": signer})
        except OSError as exc:
            self.metrics.inc("audit_errors_total")
            self._warn("audit", "cannot write the audit trail %s: %s", self.audit_path, exc)

    # -- ticker -------------------------------------------------------------------------

    def _tick_loop(self) -> None:
        next_status = 0.0
        while not self._stopping.wait(TICK_S):
            with self._lock:
                try:
                    next_status = self._tick(next_status)
                except Exception:
                    self.metrics.inc("handler_errors_total")
                    log.exception("tick failed")

    def _tick(self, next_status: float) -> float:
        now = _now_ms()
        while not self._undelivered.empty():
            request_id, node = self._undelivered.get()
            self.metrics.inc("work_undelivered_total")
            self._warn(f"undelivered-{node}", "node %s is not connected to the MQTT server "
                       "(nobody on its work topic): its work moves elsewhere", node)
            self._act(self.dispatcher.undelivered(request_id, node, now))
        self._act(self.dispatcher.tick(now))
        if self.pool is not None:
            self._pool_tick(now)
        if now >= next_status:
            self.bus.publish(self.topics.broker_status, packb(self.status(now)), qos=0, retain=True)
            next_status = now + self.config.status_interval_s * 1000
        return next_status

    def _live_count(self) -> float:
        now = _now_ms()
        return sum(self.fleet.is_live(v, now) for v in self.fleet.nodes.values())

    def status(self, now: float | None = None) -> dict[str, object]:
        """The retained ``broker/status`` document (docs/protocol.md §broker/status).
        Called under the lock."""
        now = _now_ms() if now is None else now
        lat = list(self.latencies)
        return {
            "v": 1,
            "broker": self.broker_id,
            "time": round(time.time(), 3),  # wall clock, Unix s: when this was true
            "policy": self.config.policy,
            "pending": len(self.dispatcher),
            "latency_ms": {"p50": percentile(lat, 50), "p99": percentile(lat, 99)},
            "placements": dict(self.where),
            **({"pool": self._pool_status()} if self.pool is not None else {}),
            "nodes": [self._node_row(v, now)
                      for v in sorted(self.fleet.nodes.values(), key=lambda v: v.node)],
        }

    def _node_row(self, v: NodeView, now: float) -> dict[str, Any]:
        live = self.fleet.is_live(v, now)
        load = v.load
        return {
            "node": v.node,
            "role": v.role,
            "live": live,
            "draining": v.status.draining,
            "state": ("draining" if v.status.draining else "live") if live else "offline",
            "gpu": v.status.gpu,
            "probe": load.probe if load else "",
            "queue": load.queue if load else 0,
            "in_flight": load.in_flight if load else 0,
            "outstanding": v.outstanding,
            "placements": v.placements,
            "rtt_ms": round(v.link.rtt_ms, 2),
            "gpu_util": load.gpu_util if load else 0.0,
            "mem_mb": [load.mem_used_mb, load.mem_total_mb] if load else [0.0, 0.0],
            "service_ms": {m: round(s.mean_ms, 2) for m, s in load.models.items()}
            if load else {},
            "last_seen_s": round(max(0.0, now - v.last_seen_ms) / 1000, 2),
        }

    def web_status(self) -> dict[str, object]:
        """``/status`` on the broker's HTTP port: the retained document, plus each
        model's recent outcomes, the pool's history and recent errors. Takes the lock."""
        with self._lock:
            doc = self.status()
            wall = time.time()
            known = sorted(set(self.outcomes.models()) | set(self.sla)
                           | self.fleet.known_models)
            doc["models"] = [self._model_status(m, wall) for m in known]
            doc["errors"] = {"last_1m": self.outcomes.codes(wall, 60),
                             "last_10m": self.outcomes.codes(wall, HISTORY_S),
                             "latest": list(self.outcomes.errors)}
            doc["pool_history"] = [
                {"t": t, "target": target, "ready": ready, "starting": starting}
                for t, target, ready, starting in self.pool_history]
        doc["time"] = round(wall, 3)
        doc["connected"] = self.bus.connected
        return doc

    def _model_status(self, model: str, wall: float) -> dict[str, object]:
        sla = self.sla.get(model)
        return {
            "model": model,
            "sla": {"budget_ms": sla.budget_ms, "priority": sla.priority} if sla else None,
            "last_1m": self.outcomes.summary(model, wall, 60),
            "last_10m": self.outcomes.summary(model, wall, HISTORY_S),
            "series": self.outcomes.series(model, wall),
        }

    def _scraped_nodes(self) -> list[dict[str, Any]]:
        """The node rows for one scrape (a scrape reads them once per gauge family)."""
        now = _now_ms()
        taken, rows = self._scrape
        if now - taken > SCRAPE_CACHE_MS:
            with self._lock:
                rows = [self._node_row(v, now) for v in self.fleet.nodes.values()]
            self._scrape = (now, rows)
        return rows

    # -- cloud pool ---------------------------------------------------------------------

    def _pool_tick(self, now: float) -> None:
        """Notice lost workers and finish stops every tick; size the pool every interval."""
        assert self.pool is not None
        lost = self.pool.poll(now)  # the pool logs each, with its exit code
        self.metrics.inc("pool_worker_crashes_total", len(lost))
        for name in lost:  # its process is gone: no need to wait for its will
            self._act(self.dispatcher.node_lost(name, now))
        if now >= self._next_scale_ms and self.pool.active:
            self._next_scale_ms = now + self.scaling.interval_ms
            self._scale(now)
        ready, starting = self._pool_counts()
        self.pool_gauges.update(ready=ready, starting=starting,
                                stopping=len(self.pool.stopping()))
        wall = time.time()
        if not self.pool_history or wall - self.pool_history[-1][0] >= HISTORY_BUCKET_S:
            self.pool_history.append((round(wall, 3), int(self.pool_gauges["target"]),
                                      ready, starting))
        self.dispatcher.pool_ready = ready  # an empty pool's demand (demand.wanted_cloud)

    def _pool_counts(self) -> tuple[int, int]:
        assert self.pool is not None
        workers = self.pool.workers()
        ready = sum(w.ready for w in workers)
        return ready, len(workers) - ready

    def _scale(self, now: float) -> None:
        """One autoscaler call: what was counted since the last one in, workers out."""
        assert self.pool is not None
        workers = self.pool.workers()
        busy = {w.name: v.outstanding for w in workers if (v := self.fleet.nodes.get(w.name))}
        ctx = self._scale_context(now, workers, busy)
        old = self._scale_state.target if self._scale_state else ctx.pool.size
        target, self._scale_state = scale(ctx, self._scale_state)
        self.pool_gauges["target"] = target
        self._resize(target, workers, busy, now)
        if target != old:
            self.metrics.inc("pool_scale_events_total", direction="up" if target > old else "down")
            ready, starting = self._pool_counts()
            why = reason(ctx, old, target, self._scale_state)
            log.info("scale target=%d ready=%d starting=%d reason=%s", target, ready, starting, why)
            self._audit("autoscaler", "pool.scale", {"from": old, "to": target, "why": why})

    def _scale_context(self, now: float, workers: list[Worker],
                       busy: dict[str, int]) -> ScaleContext:
        assert self.pool is not None
        ongoing = sum(busy.get(w.name, 0) for w in workers if w.ready)
        view = replace(self.pool.view(), ongoing=ongoing)
        counts = self.dispatcher.demand.take(self.fleet.known_models)
        return scale_context(now, counts, self.fleet, self.sla, view, self.scaling)

    def _resize(self, target: int, workers: list[Worker], busy: dict[str, int],
                now: float) -> None:
        assert self.pool is not None
        start, stop = plan(target, workers, busy)
        self.pool.stop(stop, now)
        if self.pool.drain_over_mqtt:
            for name in (w.name for w in workers if w.ready and w.name in stop):
                self._drain(name)
        started = self.pool.start(start, now, online=lambda name: self._online(name, now))
        self.metrics.inc("pool_workers_started_total", len(started))
        self.metrics.inc("pool_workers_stopped_total", len(stop))
        if stop or started:
            log.info("pool: started %s, stopping %s", started or "none", stop or "none")

    def _online(self, node: str, now: float) -> bool:
        view = self.fleet.nodes.get(node)
        return view is not None and self.fleet.is_live(view, now)

    def _drain(self, node: str) -> None:
        """Order ``node`` to take no new work and leave once it has answered its own."""
        self.bus.publish(self.topics.work(node), b"", qos=1, user_properties=(DRAIN,))

    def _pool_born(self, node: str) -> None:
        assert self.pool is not None
        if self.pool.drain_over_mqtt and node in self.pool.stopping():
            # Stopped while starting, born before its pod is gone: no work for it.
            self._drain(node)
        cold_ms = self.pool.born(node, _now_ms())
        if cold_ms is not None:
            self.pool_gauges["last_cold_start_seconds"] = cold_ms / 1000
            log.info("pool worker %s ready after a %.1f s cold start", node, cold_ms / 1000,
                     extra=fields(node=node))

    def _pool_status(self) -> dict[str, object]:
        assert self.pool is not None
        g = self.pool_gauges
        return {
            "backend": self.pool.kind,
            "policy": self.scaling.policy,
            "target": int(g["target"]),
            "min_size": self.scaling.min_size,
            "max_size": self.scaling.max_size,
            "ready": int(g["ready"]),
            "starting": int(g["starting"]),
            "stopping": int(g["stopping"]),
            "crashes": int(self.metrics.get("pool_worker_crashes_total")),
            "last_cold_start_ms": round(g["last_cold_start_seconds"] * 1000, 1),
            # starting (asked, not yet born), ready, or draining (told to stop, not gone)
            "workers": [{"node": w.name, "ready": w.ready,
                         "state": "ready" if w.ready else w.phase}
                        for w in self.pool.workers()]
            + [{"node": name, "ready": False, "state": "draining"}
               for name in self.pool.stopping()],
        }
