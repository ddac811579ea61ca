"""The client SDK: seal a request, publish it, wait for its one reply.

    with Client("mqtt://127.0.0.1:1883", Home("~/.skyhop").fleet_public()) as c:
        result = c.infer("digits", {"image": x}, budget_ms=50)
        result.outputs["label"]

Replies arrive on ``reply/{client_id}`` and are matched by MQTT correlation data
(the request id). A request with no reply by its budget plus ``slack_ms`` ends
locally with ``RemoteError(DEADLINE_EXCEEDED)``, so a caller never waits forever.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
import random
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, replace

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec

from skyhop.alarms import Alarm, Alarms
from skyhop.errors import ConfigError, ErrorCode, ProtocolError, RemoteError
from skyhop.mqtt.bus import Bus
from skyhop.mqtt.message import Message
from skyhop.mqtt.url import TlsFiles
from skyhop.protocol.announcement import verify as announcement_verify
from skyhop.protocol.envelope import FleetPublicKey, body_size, open_reply, seal_request
from skyhop.protocol.messages import KeyAnnouncement, ReplyHeader, RequestHeader
from skyhop.protocol.tensors import decode_body, encode_body
from skyhop.protocol.topics import Topics
from skyhop.security.sla import Rejected, SlaBook

log = logging.getLogger("skyhop.client")


# Answered without a result and safe to send again (docs/protocol.md, error codes).
RETRIED = frozenset({ErrorCode.UNAVAILABLE, ErrorCode.OVERLOADED})
RETRY_BACKOFF_S = 0.05  # the first retry waits up to this long, each next twice as long
MIN_RETRY_BUDGET_S = 0.01  # no retry with less budget than this left
MIN_SEND_MS = 1.0  # a held request with less budget left is not sent
UNROUTED_RETRY_S = 2.5  # a request no broker heard is sent again this long at most
UNROUTED_EVERY_S = 0.2


@dataclass(frozen=True)
class Result:
    outputs: dict[str, np.ndarray]
    header: ReplyHeader  # node, where, queue_ms, service_ms
    latency_ms: float  # send to reply, on the client's clock


@dataclass
class _Waiting:
    future: Future[Result]
    request_key: bytes
    request_id: str
    sent: float
    timer: Alarm
    sealed: tuple[RequestHeader, bytes] | None = None  # as last published: to re-send
    unrouted_since: float | None = None  # when the server first said no broker heard it


@dataclass(frozen=True)
class _Held:
    header: RequestHeader
    body: bytes
    key: bytes  # the request key: kept, so the reply it is waited for with stays valid
    held_at: float  # time.monotonic() when submitted


class Client:
    def __init__(
        self,
        mqtt_url: str,
        fleet_key: FleetPublicKey,
        *,
        client_id: str | None = None,
        topics: Topics | None = None,
        slack_ms: float = 1000.0,
        tls: TlsFiles | None = None,
        trust: ec.EllipticCurvePublicKey | None = None,
    ) -> None:
        self.client_id = client_id or f"client-{uuid.uuid4().hex[:12]}"
        self.topics = topics or Topics()
        self.fleet_key = fleet_key
        self.slack_ms = slack_ms
        self.trust = trust  # the fleet CA's key: announcements signed by it move fleet_key
        self.slas = SlaBook(trust)  # with a CA, only operator-signed SLAs count
        self.sla = self.slas.current
        self.counters: Counter[str] = Counter()
        self._key_issued_at = -1
        self._waiting: dict[bytes, _Waiting] = {}
        self._lock = threading.Lock()
        self._held: dict[bytes, _Held] = {}  # submitted while disconnected (send_sealed)
        self._alarms = Alarms(f"{self.client_id}-timers")  # local deadlines, re-sends
        self.bus = Bus(mqtt_url, self.client_id, tls=tls, on_connect=self._on_connect)
        self.reply_topic = self.topics.reply(self.client_id)

    def start(self, timeout: float = 10.0) -> Client:
        self.bus.subscribe(self.reply_topic, self._on_reply, qos=1)
        self.bus.subscribe(self.topics.sla_all, self._on_sla, qos=1)
        self.bus.subscribe(self.topics.broker_lost_all, self._on_broker_lost, qos=1)
        if self.trust is not None:
            self.bus.subscribe(self.topics.keys, self._on_key_announcement, qos=1)
        self.bus.start(timeout=timeout)
        return self

    def stop(self) -> None:
        self.bus.stop()
        self._alarms.stop()
        with self._lock:
            waiting, self._waiting = self._waiting, {}
            self._held.clear()
        for w in waiting.values():
            w.timer.cancel()
            if not w.future.done():
                w.future.set_exception(RemoteError(ErrorCode.UNAVAILABLE, "client stopped"))

    def __enter__(self) -> Client:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- requests -----------------------------------------------------------------------

    def budget_for(self, model: str, budget_ms: float | None) -> float:
        if budget_ms is not None:
            return budget_ms
        if model in self.sla:
            return self.sla[model].budget_ms
        raise ConfigError(
            f"no budget for {model!r}: pass budget_ms or publish its SLA "
            f"(skyhop sla set {model} --budget-ms N)"
        )

    def priority_for(self, model: str, priority: int | None) -> int:
        """The caller's priority, else the model's SLA priority, else 0 (normal)."""
        if priority is not None:
            return priority
        sla = self.sla.get(model)
        return sla.priority if sla is not None else 0

    def submit(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        *,
        budget_ms: float | None = None,
        priority: int | None = None,
    ) -> Future[Result]:
        """Publish one request; the future resolves to a Result or raises RemoteError.

        Without ``budget_ms`` / ``priority`` the model's SLA (``skyhop sla set``) gives them.
        """
        budget = self.budget_for(model, budget_ms)
        body = encode_body("inputs", inputs)
        header = RequestHeader(
            id=uuid.UUID(bytes=os.urandom(16)).hex,
            model=model,
            budget_ms=float(budget),
            sent_at_ms=time.time_ns() // 1_000_000,
            kid=self.fleet_key.kid,
            size=body_size(len(body)),
            reply=self.reply_topic,
            priority=self.priority_for(model, priority),
        )
        envelope, key = seal_request(header, body, self.fleet_key)
        return self.send_sealed(header, envelope, key, body=body)

    def send_sealed(self, header: RequestHeader, envelope: bytes, key: bytes, *,
                    body: bytes | None = None) -> Future[Result]:
        """Publish an already sealed envelope (tests use it to send tampered ones).

        While the MQTT connection is down a request with its ``body`` is held here, not
        in the MQTT library's queue: at the reconnect it is sealed again with the budget
        it has left, or, with none left, ended ``DEADLINE_EXCEEDED`` unsent. Queued as it
        was, it would reach a broker with its whole budget, be run, and be answered to
        nobody (the client gave up on it at its deadline)."""
        future: Future[Result] = Future()
        correlation = header.id.encode()
        with self._lock:  # armed under the lock: an alarm due at once finds it waiting
            timer = self._alarms.after(
                (header.budget_ms + self.slack_ms) / 1000, self._expire, correlation
            )
            self._waiting[correlation] = _Waiting(future, key, header.id, time.monotonic(), timer)
        if body is not None and not self.bus.connected:
            with self._lock:
                self._held[correlation] = _Held(header, body, key, time.monotonic())
            self.counters["held_while_disconnected"] += 1
            if self.bus.connected:  # it came back meanwhile, its hook perhaps run already
                self._send_held()
            return future
        self._publish(header, envelope)
        return future

    def _publish(self, header: RequestHeader, envelope: bytes) -> None:
        correlation = header.id.encode()
        with self._lock:
            if (w := self._waiting.get(correlation)) is not None:
                w.sealed = (header, envelope)
        self.bus.publish(
            self.topics.req(header.model),
            envelope,
            qos=1,
            response_topic=self.reply_topic,
            correlation=correlation,
            expiry_s=max(1, int(header.budget_ms / 1000) + 1),
            on_unheard=functools.partial(self._unrouted, correlation),
        )

    def _on_connect(self) -> None:
        """On (re)connect, each request sent before goes out again as it was: a server
        restarted without persistence lost those still in it, and their replies.
        Brokers drop a copy they hold and answer one they answered from their reply
        cache; agents run none twice (ADR 0010). Then the held ones go out."""
        self.counters["resent_after_reconnect"] += self._send_waiting_again()
        self._send_held()

    def _send_waiting_again(self) -> int:
        """Publish again, as it was, each request still waiting that was published (a
        held one never was); how many."""
        with self._lock:
            again = [w.sealed for w in self._waiting.values() if w.sealed is not None]
        for header, envelope in again:
            self._publish(header, envelope)
        return len(again)

    def _send_held(self) -> None:
        """Each held request goes out with what is left of its budget."""
        with self._lock:
            held, self._held = self._held, {}
        for correlation, h in held.items():
            left_ms = h.header.budget_ms - (time.monotonic() - h.held_at) * 1000
            if left_ms < MIN_SEND_MS:
                self._fail(correlation, ErrorCode.DEADLINE_EXCEEDED, "the budget ran out while "
                           "this client was disconnected from the MQTT server; never sent")
                continue
            header = replace(h.header, budget_ms=left_ms, sent_at_ms=time.time_ns() // 1_000_000)
            envelope, _ = seal_request(header, h.body, self.fleet_key, request_key=h.key)
            self.counters["resealed_after_reconnect"] += 1
            self._publish(header, envelope)

    def _on_broker_lost(self, msg: Message) -> None:
        """A broker died (its Will): it may have held some of our requests, so send
        again every one still waiting, as it was. A surviving broker takes those it
        lacks and drops those it holds; an agent that ran one answers from its result
        cache, and one running it answers both brokers (ADR 0010). Time already spent
        counts: the survivor reads it from the send stamp (skyhop.protocol.age)."""
        sent = self._send_waiting_again()
        self.counters["resent_after_broker_lost"] += sent
        log.info("broker %s lost: sent %d waiting request(s) again",
                 self.topics.level(msg.topic, 1), sent)

    def _send_again(self, correlation: bytes) -> None:
        with self._lock:
            w = self._waiting.get(correlation)
        if w is not None and w.sealed is not None:
            self._publish(*w.sealed)

    def _unrouted(self, correlation: bytes) -> None:
        """The MQTT server had no broker to give the request to, and dropped it. Brokers
        reconnect within ``UNROUTED_RETRY_S`` of a restarted server (their backoff), so
        send it again every ``UNROUTED_EVERY_S`` until then, within its budget: nobody
        took it, so nothing can run twice. Then say so, not silence until the deadline
        (``infer`` retries, as after a broker restart)."""
        now = time.monotonic()
        with self._lock:
            w = self._waiting.get(correlation)
            if w is not None and w.unrouted_since is None:
                w.unrouted_since = now
        if w is not None and w.sealed is not None and w.unrouted_since is not None:
            left_s = w.sealed[0].budget_ms / 1000 - (now - w.sent)
            if (now - w.unrouted_since < UNROUTED_RETRY_S
                    and left_s > UNROUTED_EVERY_S):
                self.counters["unrouted_retries"] += 1
                self._alarms.after(UNROUTED_EVERY_S, self._send_again, correlation)
                return
        self.counters["unrouted_requests"] += 1
        self._fail(correlation, ErrorCode.UNAVAILABLE, "no broker is subscribed to requests "
                   "on this MQTT server (is `skyhop broker` running and connected?); the "
                   "request was dropped")

    def _fail(self, correlation: bytes, code: ErrorCode, message: str) -> None:
        """End a request here, with this error, if it is still waiting."""
        with self._lock:
            w = self._waiting.pop(correlation, None)
            self._held.pop(correlation, None)
        if w is not None and not w.future.done():
            w.timer.cancel()
            w.future.set_exception(RemoteError(code, message))

    def infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        *,
        budget_ms: float | None = None,
        priority: int | None = None,
        retries: int = 2,
    ) -> Result:
        """Run one request and wait for its result (or its RemoteError).

        An ``UNAVAILABLE`` or ``OVERLOADED`` answer (a broker stopping for a restart, no
        node free, this client over its rate) is sent again, up to ``retries`` times, as
        a new request with what is left of the budget, after a short jittered backoff.
        Inference has no side effects, so a request a stopping broker gave up on may
        safely run twice. ``submit`` never retries.
        """
        budget = self.budget_for(model, budget_ms)
        end = time.monotonic() + budget / 1000
        for attempt in range(retries + 1):
            left_ms = budget if attempt == 0 else (end - time.monotonic()) * 1000
            try:
                return self.submit(model, inputs, budget_ms=left_ms, priority=priority).result()
            except RemoteError as exc:
                backoff_s = random.uniform(0, RETRY_BACKOFF_S * 2**attempt)
                if exc.code not in RETRIED or attempt == retries \
                        or time.monotonic() + backoff_s >= end - MIN_RETRY_BUDGET_S:
                    raise
                self.counters["retries"] += 1
                time.sleep(backoff_s)
        raise AssertionError("unreachable: the last attempt returns or raises")

    # -- replies (paho thread) ------------------------------------------------------------

    def _on_reply(self, msg: Message) -> None:
        with self._lock:
            w = self._waiting.pop(msg.correlation or b"", None)
        if w is None:
            self.counters["unmatched_replies"] += 1  # after our local deadline, or a duplicate
            return
        w.timer.cancel()
        latency = (time.monotonic() - w.sent) * 1000
        try:
            header, body = open_reply(msg.payload, w.request_key, w.request_id)
            if body is None:
                raise RemoteError(header.status, header.message)
            outputs = decode_body("outputs", body)
        except (ProtocolError, RemoteError) as exc:
            w.future.set_exception(
                exc if isinstance(exc, RemoteError) else RemoteError(exc.code, exc.message)
            )
            return
        w.future.set_result(Result(outputs, header, latency))

    def _expire(self, correlation: bytes) -> None:
        with self._lock:
            held = self._held.pop(correlation, None) is not None
        self._fail(correlation, ErrorCode.DEADLINE_EXCEEDED,
                   "the MQTT server was unreachable for the whole budget; never sent" if held
                   else "no reply from the fleet within the budget")

    def _on_sla(self, msg: Message) -> None:
        try:
            self.slas.offer(self.topics.model_of(msg.topic), msg.payload,
                            dt.datetime.now(dt.timezone.utc))
        except (ProtocolError, Rejected):
            self.counters["ignored_slas"] += 1

    def _on_key_announcement(self, msg: Message) -> None:
        """Follow a fleet key rotation; ignore (and count) anything not signed by the CA."""
        assert self.trust is not None
        try:
            announcement = KeyAnnouncement.decode(msg.payload)
            key = announcement_verify(announcement, self.trust)
        except ProtocolError as exc:
            self.counters["bad_key_announcements"] += 1
            log.warning("ignored a key announcement on %s: %s", msg.topic, exc.message)
            return
        if announcement.issued_at_ms <= self._key_issued_at:
            self.counters["stale_key_announcements"] += 1
            return  # a replay of an older announcement must not roll the key back
        self._key_issued_at = announcement.issued_at_ms
        if key.kid != self.fleet_key.kid:
            log.info("fleet key rotated: %s -> %s", self.fleet_key.kid, key.kid)
        self.fleet_key = key
