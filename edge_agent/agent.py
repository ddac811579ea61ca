"""The edge agent's shell: MQTT in, ONNX Runtime, MQTT out (docs/architecture.md §Agent).

Threads:
- paho's network thread runs ``_on_work``: it only peeks the clear header, answers
  duplicates and a full queue at once, and queues the job by deadline;
- ``concurrency`` worker threads pop the earliest deadline, open the envelope, run the
  model and publish the sealed reply;
- one reporter thread publishes load (and pings the server to measure round trip).

Every job that reaches the queue ends with exactly one reply: a result, or a named
error (``DEADLINE_EXCEEDED`` for one that expired while queued, ``BAD_ENVELOPE``,
``UNKNOWN_KEY``, ``BAD_REQUEST``, ``INTERNAL``…). A worker never dies on bad input.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from edge_agent.config import AgentConfig
from edge_agent.probe import MIB, Probe, ProbeError, ProbeSample
from edge_agent.runner import ModelRunner
from edge_agent.workqueue import Job, ResultCache, WorkQueue
from skyhop.errors import ErrorCode, ProtocolError
from skyhop.home import WorkerKeys
from skyhop.logs import fields
from skyhop.metrics import Metrics, counter, gauge, histogram
from skyhop.mqtt.bus import Bus
from skyhop.mqtt.message import Message, Will
from skyhop.mqtt.url import TlsFiles
from skyhop.protocol.age import Ages
from skyhop.protocol.envelope import (
    OpenedRequest,
    error_reply,
    open_request,
    peek_request,
    seal_reply,
)
from skyhop.protocol.messages import (
    ANNOUNCE,
    CLOCK,
    DRAIN,
    OK,
    LoadReport,
    ModelLoad,
    NodeStatus,
    ReplyHeader,
    WorkMeta,
)
from skyhop.protocol.replay import ReplayGuard
from skyhop.protocol.tensors import decode_body, encode_body
from skyhop.protocol.topics import Topics
from skyhop.stats import ServiceTime

log = logging.getLogger("skyhop.agent")
KEY_REFRESH_S = 2.0

# Exported as skyhop_agent_<name> (docs/operations.md lists them all).
METRICS = {
    "accepted_total": counter("Requests taken into this node's queue."),
    "replies_total": counter("Replies sent, by code (OK or an error code).", "code"),
    "duplicates_total": counter("Redelivered requests answered from the result cache."),
    "expired_in_queue_total": counter("Requests whose budget ran out while queued here."),
    "stale_total": counter("Work that arrived after its budget (this agent was stopped, or "
                           "the MQTT server held it): answered DEADLINE_EXCEEDED, never run."),
    "no_reply_topic_total": counter("Requests dropped for want of a reply topic."),
    "status_restored_total": counter("Times this node re-announced a status that was "
                                     "cleared or overwritten on the MQTT server."),
    "probe_errors_total": counter("Failed reads of the device's telemetry."),
    "report_errors_total": counter("Load reports that could not be published."),
    "key_refresh_errors_total": counter("Failed re-reads of the worker keys."),
    "queue_wait_seconds": histogram("Time from a request's arrival here to its run.",
                                    "model"),
    "service_seconds": histogram("Time the model ran for one request.", "model"),
    "queue_depth": gauge("Requests waiting in this node's queue."),
    "in_flight": gauge("Requests running now."),
    "device_utilization_ratio": gauge("Accelerator (or CPU) utilisation, 0 to 1, as the "
                                      "last load report read it.", "device", "probe"),
    "device_memory_used_bytes": gauge("Accelerator memory in use.", "device", "probe"),
    "device_memory_total_bytes": gauge("Accelerator memory in all.", "device", "probe"),
}


@dataclass(frozen=True)
class _Work:
    envelope: bytes
    reply_topic: str
    correlation: bytes | None
    priority: int


class Agent:
    """One node. Build with its runners and keys; ``start()`` connects, ``stop()`` leaves."""

    def __init__(
        self,
        *,
        node_id: str,
        mqtt_url: str,
        runners: Mapping[str, ModelRunner],
        key_source: Callable[[], WorkerKeys],
        probe: Probe,
        config: AgentConfig | None = None,
        topics: Topics | None = None,
        role: str = "edge",
        bus_factory: type[Bus] = Bus,
        tls: TlsFiles | None = None,
        run_log: Path | None = None,
    ) -> None:
        """``run_log``: append one JSON line per job started (request id, wall-clock
        ms), a record of what ran that chaos runs count from (bench/chaos.py)."""
        self.node_id = node_id
        self._run_log = run_log.open("a", buffering=1) if run_log is not None else None
        self._run_log_lock = threading.Lock()
        self.role = role
        self.runners = dict(runners)
        self._key_source = key_source  # re-read every KEY_REFRESH_S: rotation needs no restart
        self._keys = key_source()
        self.probe = probe
        self.config = config or AgentConfig()
        self.concurrency = self.config.concurrency or 1  # the builder sets it from the device
        self.topics = topics or Topics()
        # bdSeq: grows with each start so a stale death cannot kill a newer birth.
        self.session = time.time_ns() // 1_000_000
        self.metrics = Metrics("skyhop_agent", METRICS)
        self.metrics.read("queue_depth", lambda: len(self._queue))
        self.metrics.read("in_flight", lambda: self._in_flight)
        # The accelerator as the last load report read it: a scrape never calls the probe.
        device = (probe.device, probe.kind)
        self.metrics.read("device_utilization_ratio", lambda: {device: self._sample.util})
        self.metrics.read("device_memory_used_bytes",
                          lambda: {device: self._sample.mem_used_mb * MIB})
        self.metrics.read("device_memory_total_bytes",
                          lambda: {device: self._sample.mem_total_mb * MIB})
        self.service = {
            m: ServiceTime(prior_ms=getattr(r, "warmup_ms", None) or None)
            for m, r in self.runners.items()
        }
        self._queue = WorkQueue(self.config.queue_capacity)
        self._cache = ResultCache(self.config.result_cache)
        self._ages = Ages()  # how long work waited on its way, per broker clock
        self._replay = ReplayGuard(self.config.replay_window_s * 1000)
        self._cond = threading.Condition()
        self._in_flight = 0
        self._seq = 0
        self._rtt_ms = 0.0
        self._sample = ProbeSample(probe.kind, probe.device, 0.0, 0.0, 0.0)
        self._stopping = threading.Event()
        # A broker's drain order (a pool scale-down): no new work; ``drained`` once the
        # last held job has its reply and the death is out.
        self.draining = threading.Event()
        self.drained = threading.Event()
        self._threads: list[threading.Thread] = []
        will = Will(self.topics.status(node_id), self._status(online=False), qos=1, retain=True)
        # Set when another process connects as this node: this one must leave (mqtt.Bus).
        self.taken_over = threading.Event()
        self.bus = bus_factory(
            mqtt_url, f"skyhop-agent-{node_id}", will=will, on_connect=self._on_connect,
            on_taken_over=self.taken_over.set, tls=tls
        )

    # -- lifecycle ----------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        self.bus.subscribe(self.topics.status(self.node_id), self._on_own_status, qos=1)
        self.bus.subscribe(self.topics.work(self.node_id), self._on_work, qos=1)
        self.bus.subscribe(self.topics.ping(self.node_id), self._on_ping, qos=0)
        self.bus.start(timeout=timeout)
        for i in range(self.concurrency):
            self._spawn(self._work_loop, f"skyhop-worker-{i}")
        self._spawn(self._report_loop, "skyhop-reporter")
        log.info(
            "agent %s up: role=%s models=%s probe=%s concurrency=%d session=%d",
            self.node_id,
            self.role,
            ",".join(self.runners),
            self.probe.kind,
            self.concurrency,
            self.session,
        )

    def stop(self) -> None:
        """Leave cleanly: publish death ourselves (a clean DISCONNECT suppresses the will)."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        if self.bus.connected and not self.taken_over.is_set():  # the node lives on elsewhere
            self.bus.publish(self.topics.status(self.node_id),
                             self._status(online=False, stopped=True), qos=1, retain=True)
        for t in self._threads:
            t.join(timeout=5)
        self.bus.flush(2.0)  # the death, and replies just sent: the Will is discarded
        self.bus.stop()
        self.probe.close()
        if self._run_log is not None:
            with self._run_log_lock:
                self._run_log.close()
                self._run_log = None
        log.info("agent %s stopped (session %d)", self.node_id, self.session)

    def ready(self) -> bool:
        """Serving: connected and not draining (an HTTP /readyz, for Kubernetes)."""
        return self.bus.connected and not self.draining.is_set() and not self._stopping.is_set()

    def _spawn(self, target: Callable[[], object], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _on_connect(self) -> None:
        self.bus.publish(
            self.topics.status(self.node_id), self._status(online=True), qos=1, retain=True
        )

    def _status(self, *, online: bool, stopped: bool = False) -> bytes:
        return NodeStatus(
            node=self.node_id,
            online=online,
            session=self.session,
            role=self.role,
            models=tuple(self.runners),
            gpu=self.probe.device,
            concurrency=self.concurrency,
            draining=online and self.draining.is_set(),
            stopped=stopped,
        ).encode()

    def _on_own_status(self, msg: Message) -> None:
        """A newer process as this node (a copied config, two pools racing for a name)
        means this one must leave: the two would take the MQTT session from each other
        forever. The newest session wins, as the MQTT server's takeover does. Its status
        may read offline: each takeover fires the Will of the one pushed out. A status
        that is no birth at all (cleared, garbage) is replaced by this one's."""
        try:
            status = NodeStatus.decode(msg.payload) if msg.payload else None
        except ProtocolError:
            status = None
        if status is None:
            # Cleared, or garbage over our birth: a broker started now would never see
            # this node live (its load reports alone do not make it so). Put it back.
            if not self._stopping.is_set():
                self.metrics.inc("status_restored_total")
                log.warning("node %s: its retained status was %s; announcing it again",
                            self.node_id, "overwritten" if msg.payload else "cleared")
                self.bus.publish(msg.topic, self._status(online=True), qos=1, retain=True)
            return
        if status.session == self.session and status.online:
            return
        # Ours stands over the older one's birth or Will, and over our own Will when it
        # lands after our rebirth (a server that fires it late, on a takeover).
        if status.session <= self.session:
            if not self._stopping.is_set():
                self.bus.publish(msg.topic, self._status(online=True), qos=1, retain=True)
        elif not self.taken_over.is_set():
            log.error("node %s: another agent runs as this node (session %d, this one "
                      "%d); this one leaves", self.node_id, status.session, self.session)
            self.taken_over.set()

    # -- intake (paho thread: keep it quick) --------------------------------------------

    def _on_work(self, msg: Message) -> None:
        now = time.monotonic()
        if DRAIN in msg.user_properties:
            self._drain()
            return
        if ANNOUNCE in msg.user_properties:
            if not self._stopping.is_set() and not self.taken_over.is_set():
                self.metrics.inc("status_restored_total")
                self.bus.publish(self.topics.status(self.node_id), self._status(online=True),
                                 qos=1, retain=True)
            return
        reply_topic = msg.response_topic
        if CLOCK in msg.user_properties and reply_topic:
            with contextlib.suppress(ProtocolError):  # a sample, nothing to answer
                self._waited_ms(reply_topic, WorkMeta.from_properties(
                    list(msg.user_properties)), now)
            return
        if not reply_topic:
            self.metrics.inc("no_reply_topic_total")
            log.warning("work without a response topic dropped: nobody could be answered")
            return
        try:
            meta = WorkMeta.from_properties(list(msg.user_properties))
            header = peek_request(msg.payload)
        except ProtocolError as exc:
            self._reply_error(reply_topic, msg.correlation, "", exc.code, exc.message)
            return
        if self.draining.is_set():  # sent before the broker saw the drain: placed again
            self._reply_error(reply_topic, msg.correlation, header.id, ErrorCode.OVERLOADED,
                              f"node {self.node_id} is draining")
            return
        seen, cached = self._cache.lookup(header.id)
        if seen:
            self.metrics.inc("duplicates_total")
            if cached is None:  # in progress: answer this asker too (another broker's?)
                cached = self._cache.also(header.id, (reply_topic, msg.correlation))
            if cached is not None:
                self.bus.publish(reply_topic, cached, qos=1, correlation=msg.correlation)
            return
        remaining_ms = meta.remaining_ms - self._waited_ms(reply_topic, meta, now)
        if remaining_ms <= 0:
            self.metrics.inc("stale_total")
            self._reply_error(reply_topic, msg.correlation, header.id,
                              ErrorCode.DEADLINE_EXCEEDED,
                              f"it reached node {self.node_id} after its budget (this agent "
                              "was stopped, or the MQTT server held it); never run")
            return
        work = _Work(msg.payload, reply_topic, msg.correlation, header.priority)
        with self._cond:
            try:
                self._queue.push(
                    header.id, now + remaining_ms / 1000, now, work, header.priority
                )
            except ProtocolError as exc:
                self._reply_error(reply_topic, msg.correlation, header.id, exc.code, exc.message)
                return
            self._cache.begin(header.id, (reply_topic, msg.correlation))
            self._cond.notify()
        self.metrics.inc("accepted_total")

    def _waited_ms(self, reply_topic: str, meta: WorkMeta, now: float) -> float:
        """How much longer than its broker's quickest this work took to arrive: the time
        this process was stopped, or the message sat queued (skyhop.protocol.age)."""
        if meta.sent_ms is None:
            return 0.0
        return self._ages.age_ms(f"{reply_topic} {meta.clock}", meta.sent_ms, now * 1000)

    def _drain(self) -> None:
        if self.draining.is_set():
            return
        self.draining.set()
        log.info("node %s draining: no new work; leaving once the %d held are answered",
                 self.node_id, len(self._queue) + self._in_flight)
        self.bus.publish(self.topics.status(self.node_id), self._status(online=True),
                         qos=1, retain=True)
        self._check_drained()

    def _check_drained(self) -> None:
        """Once a draining node holds nothing, it leaves as on a clean stop."""
        with self._cond:
            held = len(self._queue) + self._in_flight
        if self.draining.is_set() and not held and not self.drained.is_set():
            log.info("node %s drained", self.node_id)
            self.drained.set()

    # -- workers ------------------------------------------------------------------------

    def _work_loop(self) -> None:
        while not self._stopping.is_set():
            job = self._next_job()
            if job is None:
                continue
            try:
                self._run(job)
            except Exception as exc:  # a bug must cost one request, never the worker
                log.exception("worker failed on %s", job.request_id)
                self._finish(job, None, ErrorCode.INTERNAL, f"worker error: {exc}")
            finally:
                with self._cond:
                    self._in_flight -= 1
                if self.draining.is_set():
                    self._check_drained()

    def _next_job(self) -> Job | None:
        with self._cond:
            while True:
                job, expired = self._queue.pop(time.monotonic())
                for late in expired:
                    self.metrics.inc("expired_in_queue_total")
                    self._finish(
                        late,
                        None,
                        ErrorCode.DEADLINE_EXCEEDED,
                        "budget ran out while queued at the node",
                    )
                if job is not None:
                    self._in_flight += 1
                    return job
                if self._stopping.is_set():
                    return None
                self._cond.wait(timeout=0.5)

    def _run(self, job: Job) -> None:
        work: _Work = job.payload
        started = time.monotonic()
        try:
            opened = self._open(work.envelope)
            h = opened.header
            self._replay.check(h.id, h.sent_at_ms, time.time() * 1000, h.budget_ms)
            runner = self.runners.get(opened.header.model)
            if runner is None:
                raise ProtocolError(
                    ErrorCode.UNKNOWN_MODEL,
                    f"node {self.node_id} does not serve {opened.header.model}",
                )
            inputs = decode_body("inputs", opened.body)
            self._record_run(h.id)
            t0 = time.monotonic()
            outputs = runner.run(inputs)
            service_ms = (time.monotonic() - t0) * 1000
        except ProtocolError as exc:
            self._finish(job, None, exc.code, exc.message)
            return
        self.service[opened.header.model].observe(service_ms)
        model = opened.header.model
        self.metrics.observe("queue_wait_seconds", started - job.received, model=model)
        self.metrics.observe("service_seconds", service_ms / 1000, model=model)
        header = ReplyHeader(
            id=opened.header.id,
            status=OK,
            node=self.node_id,
            where=self.role,
            queue_ms=(started - job.received) * 1000,
            service_ms=service_ms,
        )
        body = encode_body("outputs", outputs)
        self._finish(job, seal_reply(header, body, opened.request_key), None, "")

    def _open(self, envelope: bytes) -> OpenedRequest:
        keys = self._keys
        try:
            return open_request(envelope, keys.active)
        except ProtocolError as exc:
            kid = peek_request(envelope).kid if exc.code == ErrorCode.UNKNOWN_KEY else ""
            if kid in keys.retired:
                raise ProtocolError(
                    ErrorCode.KEY_RETIRED,
                    f"fleet key {kid} was rotated out and its grace period ended: seal to "
                    f"the current key (retained on {self.topics.keys})",
                ) from None
            raise

    def _record_run(self, request_id: str) -> None:
        line = json.dumps({"id": request_id, "node": self.node_id,
                           "start_ms": round(time.time() * 1000, 3)})
        with self._run_log_lock:
            if self._run_log is not None:  # closed at stop
                self._run_log.write(line + "\n")

    def _finish(self, job: Job, reply: bytes | None, code: ErrorCode | None, message: str) -> None:
        work: _Work = job.payload
        if reply is None:
            assert code is not None
            reply = self._reply_error(
                work.reply_topic, work.correlation, job.request_id, code, message
            )
        else:
            self.metrics.inc("replies_total", code="OK")
            self.bus.publish(work.reply_topic, reply, qos=1, correlation=work.correlation)
        for topic, correlation in self._cache.finish(job.request_id, reply):
            self.bus.publish(topic, reply, qos=1, correlation=correlation)

    def _reply_error(
        self, topic: str, correlation: bytes | None, request_id: str, code: ErrorCode, message: str
    ) -> bytes:
        self.metrics.inc("replies_total", code=code)
        log.info("request %s answered %s: %s", request_id or "?", code, message,
                 extra=fields(request_id=request_id or None, node=self.node_id, code=code))
        reply = error_reply(
            ReplyHeader(
                id=request_id, status=code, message=message, node=self.node_id, where=self.role
            )
        )
        self.bus.publish(topic, reply, qos=1, correlation=correlation)
        return reply

    # -- telemetry ----------------------------------------------------------------------

    def load_report(self) -> LoadReport:
        try:
            sample = self._sample = self.probe.sample()
        except ProbeError as exc:
            # A failed read must not silence the node: the broker would think it dead.
            self.metrics.inc("probe_errors_total")
            log.warning("telemetry probe failed (%s); reporting the last sample", exc)
            sample = self._sample
        with self._cond:
            queued, running = len(self._queue), self._in_flight
        self._seq += 1
        return LoadReport(
            node=self.node_id,
            session=self.session,
            seq=self._seq,
            queue=queued,
            in_flight=running,
            capacity=self.config.queue_capacity + self.concurrency,
            rtt_ms=self._rtt_ms,
            gpu_util=min(1.0, max(0.0, sample.util)),
            mem_used_mb=sample.mem_used_mb,
            mem_total_mb=sample.mem_total_mb,
            probe=sample.kind,
            models={m: ModelLoad(s.mean_ms, s.p95_ms, s.count) for m, s in self.service.items()},
        )

    def _report_loop(self) -> None:
        next_key_refresh = time.monotonic() + KEY_REFRESH_S
        while not self._stopping.wait(self.config.load_interval_s):
            self._check_drained()  # also when the last held jobs expired in the queue
            if time.monotonic() >= next_key_refresh:
                next_key_refresh = time.monotonic() + KEY_REFRESH_S
                self._refresh_keys()
            try:
                if self.bus.connected:
                    self.bus.publish(
                        self.topics.ping(self.node_id), str(time.monotonic()).encode(), qos=0
                    )
                    self.bus.publish(
                        self.topics.load(self.node_id),
                        self.load_report().encode(),
                        qos=0,
                        retain=True,
                    )
            except Exception:
                self.metrics.inc("report_errors_total")
                log.exception("load report failed")

    def _refresh_keys(self) -> None:
        try:
            keys = self._key_source()
        except Exception as exc:  # a half-copied key file must not stop the node
            self.metrics.inc("key_refresh_errors_total")
            log.warning("keeping the current worker keys: %s", exc)
            return
        if keys.active.keys() != self._keys.active.keys() or keys.retired != self._keys.retired:
            log.info(
                "worker keys now %s (retired: %s)",
                ",".join(keys.active),
                ",".join(sorted(keys.retired)) or "none",
            )
        self._keys = keys

    def _on_ping(self, msg: Message) -> None:
        try:
            sample = (time.monotonic() - float(msg.payload)) * 1000
        except ValueError:
            return
        self._rtt_ms = sample if self._rtt_ms == 0 else 0.8 * self._rtt_ms + 0.2 * sample


def default_node_id() -> str:
    return os.uname().nodename.split(".")[0] or "node"
