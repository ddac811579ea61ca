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
from itertools import takewhile
from pathlib import Path

import numpy as np

from edge_agent.config import AgentConfig
from edge_agent.probe import MIB, Probe, ProbeError, ProbeSample
from edge_agent.runner import ModelRunner, TensorSpec, validate_inputs
from edge_agent.workqueue import Job, ResultCache, WorkQueue
from skyhop.batching import BatchPoint, BatchPolicy, BatchTimes, admit, batch_ms, curve
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
    "service_seconds": histogram("Time one model run took (a batch runs once).", "model"),
    "runs_total": counter("Model runs; requests ÷ runs is the mean batch size.", "model"),
    "queue_depth": gauge("Requests waiting in this node's queue."),
    "in_flight": gauge("Requests running now."),
    "device_utilization_ratio": gauge("Accelerator (or CPU) utilisation, 0 to 1, as the "
                                      "last load report read it.", "device", "probe"),
    "device_memory_used_bytes": gauge("Accelerator memory in use.", "device", "probe"),
    "device_memory_total_bytes": gauge("Accelerator memory in all.", "device", "probe"),
}


@dataclass(slots=True)
class _Work:
    """A queued request, and what the worker that first took it learnt of it."""

    envelope: bytes
    reply_topic: str
    correlation: bytes | None
    priority: int
    model: str  # from the clear header: batches form before anything is opened
    opened: OpenedRequest | None = None  # opened and checked once, kept if put back
    inputs: dict[str, np.ndarray] | None = None
    back: bool = False  # put back in the queue by a batch it did not join
    recorded: bool = False  # its start is in the run log
    answered: bool = False


def _rows(inputs: Mapping[str, np.ndarray] | None) -> int:
    return int(next(iter(inputs.values())).shape[0]) if inputs else 1


def _shape_key(inputs: Mapping[str, np.ndarray] | None) -> tuple[object, ...] | None:
    """Requests with equal keys concatenate along dim 0; None: this one cannot (its
    inputs disagree on their number of rows)."""
    if not inputs:
        return None
    rows = {a.shape[0] for a in inputs.values()}
    if len(rows) != 1:
        return None
    return tuple((name, a.shape[1:]) for name, a in sorted(inputs.items()))


def _split(outputs: Mapping[str, np.ndarray], rows: list[int],
           model: str) -> list[dict[str, np.ndarray]]:
    """A batch's outputs cut back into each member's rows."""
    total = sum(rows)
    for name, out in outputs.items():
        if out.ndim == 0 or out.shape[0] != total:
            raise ProtocolError(ErrorCode.INTERNAL, f"model {model} output {name!r} has "
                                f"shape {out.shape}, not {total} rows: it does not batch")
    cuts = np.cumsum(rows)[:-1]
    parts = {name: np.split(out, cuts) for name, out in outputs.items()}
    return [{name: parts[name][i] for name in outputs} for i in range(len(rows))]


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
        batching: Mapping[str, BatchPolicy] | None = None,
    ) -> None:
        """``run_log``: append one JSON line per job started (request id, wall-clock
        ms), a record of what ran that chaos runs count from (bench/chaos.py).
        ``batching``: per model, how its queued requests share a run; a model whose
        tensors have no dynamic batch dimension (``batchable``) never batches."""
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
        self.batching = {m: p for m, p in (batching or {}).items()
                         if p.enabled and m in self.runners and batchable(self.runners[m])}
        self.batch_times = {m: BatchTimes() for m in self.batching}
        # Whether a worker may be holding a job for company (``_wait_for_company``).
        self._waits = any(p.max_delay_ms > 0 for p in self.batching.values())
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
        work = _Work(msg.payload, reply_topic, msg.correlation, header.priority, header.model)
        with self._cond:
            try:
                self._queue.push(
                    header.id, now + remaining_ms / 1000, now, work, header.priority
                )
            except ProtocolError as exc:
                self._reply_error(reply_topic, msg.correlation, header.id, exc.code, exc.message)
                return
            self._cache.begin(header.id, (reply_topic, msg.correlation))
            # A worker holding a job for company must hear of it, not just any one.
            if self._waits:
                self._cond.notify_all()
            else:
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
            popped = self._next_jobs()
            try:
                run = self._batch([j for j in popped if self._prepare(j)])
                if run:
                    self._execute(run)
            except Exception as exc:  # a bug must cost its requests, never the worker
                log.exception("worker failed on %s", ",".join(j.request_id for j in popped))
                for job in popped:
                    if not job.payload.answered and not job.payload.back:
                        self._finish(job, None, ErrorCode.INTERNAL, f"worker error: {exc}")
            finally:
                with self._cond:  # those put back left the count when they went back
                    self._in_flight -= sum(1 for j in popped if not j.payload.back)
                if self.draining.is_set():
                    self._check_drained()

    def _next_jobs(self) -> list[Job]:
        """The earliest-deadline job, and for a batching model the same model's jobs
        queued right behind it (``WorkQueue.take``); [] when stopping."""
        with self._cond:
            while True:
                job, expired = self._queue.pop(time.monotonic())
                self._expire(expired)
                if job is not None:
                    break
                if self._stopping.is_set():
                    return []
                self._cond.wait(timeout=0.5)
            job.payload.back = False
            self._in_flight += 1  # at once: a drain must not see it while it waits
            policy = self.batching.get(job.payload.model)
            if policy is None:
                return [job]
            self._wait_for_company(job, policy)
            model = job.payload.model
            more, expired = self._queue.take(
                time.monotonic(), lambda j: j.payload.model == model, policy.max_batch - 1)
            self._expire(expired)
            for j in more:
                j.payload.back = False
            self._in_flight += len(more)
            return [job, *more]

    def _expire(self, expired: list[Job]) -> None:
        for late in expired:
            self.metrics.inc("expired_in_queue_total")
            self._finish(late, None, ErrorCode.DEADLINE_EXCEEDED,
                         "budget ran out while queued at the node")

    def _wait_for_company(self, head: Job, policy: BatchPolicy) -> None:
        """Hold ``head`` up to the policy's delay for a fuller batch, but never past the
        moment a full batch could still meet its deadline. Called holding the lock."""
        if policy.max_delay_ms <= 0:
            return
        model = head.payload.model
        full = batch_ms(self._curve(model), policy.max_batch) / 1000
        until = min(time.monotonic() + policy.max_delay_ms / 1000, head.deadline - full)
        while (not self._stopping.is_set()
               and self._queue.count(lambda j: j.payload.model == model) < policy.max_batch - 1):
            left = until - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(timeout=left)

    def _prepare(self, job: Job) -> bool:
        """Open, check and decode a job's request once (a job put back keeps it);
        False when it was answered with an error instead."""
        work: _Work = job.payload
        if work.opened is not None:
            return True
        try:
            opened = self._open(work.envelope)
            h = opened.header
            self._replay.check(h.id, h.sent_at_ms, time.time() * 1000, h.budget_ms)
            runner = self.runners.get(h.model)
            if runner is None:
                raise ProtocolError(ErrorCode.UNKNOWN_MODEL,
                                    f"node {self.node_id} does not serve {h.model}")
            inputs = decode_body("inputs", opened.body)
            policy = self.batching.get(h.model)
            if policy is not None:  # each member alone, so a bad one fails alone
                validate_inputs(runner.inputs, inputs, max_batch=policy.max_batch)
        except ProtocolError as exc:
            self._finish(job, None, exc.code, exc.message)
            return False
        work.opened, work.inputs = opened, inputs
        return True

    def _batch(self, ready: list[Job]) -> list[Job]:
        """The jobs of ``ready`` that run together now (``skyhop.batching.admit``); the
        rest go back to the queue."""
        if len(ready) <= 1:
            return ready
        model = ready[0].payload.model
        key = _shape_key(ready[0].payload.inputs)
        same = ready[:1] if key is None else list(
            takewhile(lambda j: _shape_key(j.payload.inputs) == key, ready))
        curve = self._curve(model)
        n = admit(time.monotonic(), [(j.deadline, _rows(j.payload.inputs)) for j in same],
                  lambda k: batch_ms(curve, k) / 1000, self.batching[model].max_batch)
        if n < len(ready):
            with self._cond:
                for job in ready[n:]:
                    job.payload.back = True
                self._queue.put_back(ready[n:])
                self._in_flight -= len(ready) - n
                self._cond.notify_all()
        return ready[:n]

    def _execute(self, jobs: list[Job]) -> None:
        """Run ``jobs`` (one model, one shape) as one batch and reply to each. Should
        the batch fail, each runs alone: one member's trouble costs only that member."""
        model = jobs[0].payload.model
        started = time.monotonic()
        for job in jobs:
            self._record_run(job)
        try:
            outputs, service_ms = self._run_model(model, [j.payload.inputs for j in jobs])
        except ProtocolError as exc:
            if len(jobs) == 1:
                self._finish(jobs[0], None, exc.code, exc.message)
                return
            log.warning("a batch of %d for %s failed (%s); running each alone",
                        len(jobs), model, exc.message)
            for job in jobs:
                self._execute([job])
            return
        if len(jobs) == 1:
            self.service[model].observe(service_ms)
        if model in self.batch_times:
            self.batch_times[model].observe(len(jobs), service_ms)
        self.metrics.inc("runs_total", model=model)
        self.metrics.observe("service_seconds", service_ms / 1000, model=model)
        for job, out in zip(jobs, outputs, strict=True):
            self._reply_ok(job, out, started, service_ms)

    def _run_model(self, model: str, feeds: list[dict[str, np.ndarray] | None]
                   ) -> tuple[list[dict[str, np.ndarray]], float]:
        """Each feed's outputs, from one run on them all; and the run's milliseconds."""
        inputs = feeds[0] if len(feeds) == 1 else {
            name: np.concatenate([f[name] for f in feeds if f is not None])
            for name in feeds[0] or {}}
        assert inputs is not None  # prepared jobs carry their inputs
        t0 = time.monotonic()
        outputs = self.runners[model].run(inputs)
        service_ms = (time.monotonic() - t0) * 1000
        if len(feeds) == 1:
            return [outputs], service_ms
        return _split(outputs, [_rows(f) for f in feeds], model), service_ms

    def _reply_ok(self, job: Job, outputs: dict[str, np.ndarray], started: float,
                  service_ms: float) -> None:
        opened = job.payload.opened
        assert opened is not None
        model = opened.header.model
        self.metrics.observe("queue_wait_seconds", started - job.received, model=model)
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

    def _curve(self, model: str) -> tuple[BatchPoint, ...]:
        return curve(self.batch_times.get(model), self.service[model])

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

    def _record_run(self, job: Job) -> None:
        if job.payload.recorded:  # a failed batch's member, now run alone: one start
            return
        job.payload.recorded = True
        line = json.dumps({"id": job.request_id, "node": self.node_id,
                           "start_ms": round(time.time() * 1000, 3)})
        with self._run_log_lock:
            if self._run_log is not None:  # closed at stop
                self._run_log.write(line + "\n")

    def _finish(self, job: Job, reply: bytes | None, code: ErrorCode | None, message: str) -> None:
        work: _Work = job.payload
        work.answered = True
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
            models={m: ModelLoad(s.mean_ms, s.p95_ms, s.count,
                                 self._curve(m) if m in self.batching else ())
                    for m, s in self.service.items()},
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


def batchable(runner: ModelRunner) -> bool:
    """Whether requests to ``runner`` can be stacked: every input and output has a
    dynamic first dimension, the batch."""
    def dynamic(spec: TensorSpec) -> bool:
        return bool(spec.shape) and spec.shape[0] is None
    return all(map(dynamic, runner.inputs)) and all(map(dynamic, runner.outputs))


def default_node_id() -> str:
    return os.uname().nodename.split(".")[0] or "node"
