"""The MQTT 5 bus: a small wrapper over paho-mqtt that every skyhop process uses.

Callers see skyhop types and errors only (ConfigError, TransportError), never paho's::

    bus = Bus("mqtt://127.0.0.1:1883", "cam-7", will=Will(topic, b"offline"),
              on_connect=lambda: bus.publish(topic, b"online", retain=True))
    bus.subscribe("skyhop/v1/nodes/cam-7/work", handle)   # handle(msg: Message) -> None
    bus.start()                                            # waits for CONNACK
    bus.publish("skyhop/v1/req/digits", payload, response_topic=..., correlation=b"...")
    bus.stop()                                             # clean: the will is not sent

Threading: paho runs one network thread per Bus. Handlers and the ``on_connect`` hook run
on it (the hook's first run is inside ``start()``, on the caller's thread), so they must
be quick and hand real work (inference, crypto, disk) to another thread or queue: while a
handler runs, no packet is read, acknowledged or pinged. They may call ``publish`` and
``subscribe`` (which then does not wait for the SUBACK). The hook must not close over a
variable assigned from ``Bus(...).start()``: it runs before ``start()`` returns.

Initial connect: ``start()`` retries transient failures with tenacity (capped exponential
backoff, full jitter) until its timeout, and fails fast with ConfigError on refusals that
no retry can fix (bad credentials, not authorized, TLS certificates).

Delivery: ``publish`` only queues. A QoS 1 PUBACK means the broker took the message,
not that any subscriber got it or acted on it; end-to-end delivery is the reply's job.

Reconnects are done by paho's own loop, because that thread owns the socket and a second
thread calling ``reconnect()`` would race it. paho's backoff is a bare doubling with no
jitter, so after each failure we set its next delay ourselves (capped exponential with
full jitter): a fleet of agents must not hammer a restarted broker in lockstep. On every
(re)connect the bus re-subscribes everything and then calls the ``on_connect`` hook.
"""

from __future__ import annotations

import contextlib
import logging
import random
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.subscribeoptions import SubscribeOptions
from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_random_exponential
from typing_extensions import Self  # typing.Self is 3.11+

from skyhop.errors import ConfigError, TransportError
from skyhop.logthrottle import LogThrottle
from skyhop.mqtt.message import Handler, Message, Will, check_topic, match_filter
from skyhop.mqtt.properties import FastProperties, install
from skyhop.mqtt.url import MqttUrl, TlsFiles

log = logging.getLogger("skyhop.mqtt")
_paho_log = logging.getLogger("skyhop.mqtt.paho")
install()  # paho reads every packet's properties with skyhop.mqtt.properties' tables


def _not_paho_noise(record: logging.LogRecord) -> bool:
    # paho's threaded loop polls the closed socket once more after every clean
    # DISCONNECT and logs that at ERROR; our own on_disconnect reports real losses.
    return not str(record.msg).startswith("Client is not connected")


_paho_log.addFilter(_not_paho_noise)


class _PahoLog:
    """paho's logger for one Bus: everything goes on to ``skyhop.mqtt.paho``, but for the
    errors ``claim`` takes (it returns True), which the bus reports in its own words."""

    def __init__(self, claim: Callable[[str], bool]) -> None:
        self._claim = claim

    def log(self, level: int, fmt: str, *args: object) -> None:
        if level >= logging.ERROR and self._claim(fmt % args if args else fmt):
            return
        _paho_log.log(level, fmt, *args)


# Our send window of unacknowledged QoS 1/2 messages. paho's default of 20 throttles a
# burst of requests to 20 per round trip. A server that advertises a smaller Receive
# Maximum in CONNACK wins (see Bus._handshake): exceeding it is a protocol error.
MAX_INFLIGHT = 1000
# paho counts in-flight plus waiting messages here; 0 would mean unbounded memory while
# the broker is unreachable. Past this, publish raises TransportError (backpressure).
MAX_QUEUED = 50_000

# Reconnect backoff after a lost connection: delay = uniform(MIN, min(MAX, BASE * 2**n)).
# MAX is short so that a restarted MQTT server is back in use within 2 s (the jitter
# spreads a fleet's reconnects over those 2 s); a refused certificate, which retrying
# soon will not fix, backs off to REFUSED_MAX_S instead.
RECONNECT_MIN_S = 0.05
RECONNECT_BASE_S = 0.25
RECONNECT_MAX_S = 2.0
REFUSED_MAX_S = 30.0

# The server's DISCONNECT reason when another client connects with our client id.
SESSION_TAKEN_OVER = 0x8E
# PUBACK "No matching subscribers" (MQTT 5 §3.4.2.1): Mosquitto 2 sends it and drops the
# message; for a request it means no broker is listening.
NO_SUBSCRIBERS = 0x10
EARLY_ACKS = 1024  # PUBACKs kept for packet ids publish() has not filed a hook for yet

# How long the first TLS 1.3 connect waits for the server's verdict on our certificate
# (one round trip in practice; see Bus._await_tls_verdict).
TLS_VERDICT_WAIT_S = 1.0

# CONNACK reason codes that retrying cannot fix: the setup is wrong (MQTT 5 §3.2.2.2).
_CONFIG_REFUSALS = {
    0x84: "the server does not speak MQTT 5",
    0x85: "the client id is not accepted",
    0x86: "check the username and password",
    0x87: "this client is not authorized on the server",
    0x8A: "this client is banned on the server",
    0x8C: "check the authentication method",
}
_SUBSCRIPTION_ID_MAX = 268_435_455

_F = TypeVar("_F", bound=Callable[..., Any])


@dataclass
class _Sub:
    filter: str  # as given, maybe $share/group/...
    match: str  # the filter that topics are matched against
    qos: int
    handler: Handler
    sid: int  # MQTT 5 subscription identifier


@dataclass
class _SubackWaiter:
    sub: _Sub
    done: threading.Event = field(default_factory=threading.Event)
    refusal: str | None = None


class _Transient(Exception):
    """One connect attempt failed in a way that another attempt may fix."""


# --------------------------------------------------------------------------- helpers


def _system_tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()  # the system's CAs, host name checked
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def _properties(packet: int) -> FastProperties:
    return FastProperties(packet)


def _reason_name(reason: Any) -> str:
    # ReasonCode is not int()-castable; getName() gives the spec's words.
    try:
        return f"{reason.getName()} (0x{reason.value:02X})"
    except AttributeError:
        return str(reason)


def _reconnect_delay(attempt: int, most_s: float = RECONNECT_MAX_S) -> float:
    ceiling = min(most_s, RECONNECT_BASE_S * 2 ** min(attempt, 16))
    return random.uniform(RECONNECT_MIN_S, max(RECONNECT_MIN_S, ceiling))


def _is_certificate_problem(text: str) -> bool:
    # OpenSSL's words for a handshake that no retry will fix: our certificate was refused
    # (tlsv13 alert certificate required, bad certificate, unknown ca) or the server's was.
    text = text.lower()
    return any(words in text for words in (
        "certificate", "unknown ca", "verify failed",
        "protocol version", "unsupported protocol",  # a TLS 1.2-only peer: retrying won't help
    ))


# --------------------------------------------------------------------------- the bus


class Bus:
    """One MQTT 5 connection with subscriptions that survive reconnects.

    ``Bus(url, client_id, will=..., on_connect=hook, tls=TlsFiles(...))``, then
    ``subscribe`` any time, ``start()``, ``publish``, and ``stop()`` (or use ``with``).
    ``on_connect`` runs after every (re)connect, after the re-subscriptions are sent:
    republish birth/status messages there. A Bus is single-use: after ``stop()`` make a
    new one.
    """

    def __init__(
        self,
        url: MqttUrl | str,
        client_id: str,
        *,
        will: Will | None = None,
        on_connect: Callable[[], None] | None = None,
        on_taken_over: Callable[[], None] | None = None,
        tls: TlsFiles | None = None,
        keepalive: int = 15,
        clean_start: bool = True,
        session_expiry_s: int = 0,
    ) -> None:
        """``session_expiry_s`` only matters with ``clean_start=False``: the server keeps
        the session (subscriptions, queued QoS 1 messages) that long after a disconnect.

        When another client connects with this ``client_id`` the server disconnects this
        one (0x8E, session taken over). Reconnecting would take the session back, and
        the two would evict each other forever: so the bus stays down, logs why, and
        calls ``on_taken_over`` (on a thread of its own, free to call ``stop()``)."""
        self.url = MqttUrl.parse(url)
        if not client_id or not isinstance(client_id, str):
            raise ConfigError(f"bad MQTT client id {client_id!r}: must be a non-empty string")
        if tls is not None and not self.url.tls:
            raise ConfigError(f"TLS files given but the broker URL is {self.url}: use mqtts://")
        self.client_id = client_id
        self._hook = on_connect
        self._on_taken_over = on_taken_over
        # publish(on_unheard=) hooks by packet id until the PUBACK, and the PUBACK codes
        # that came before publish() could file the hook (the network thread can be that
        # quick). Packet ids are 16 bits: a reused id replaces what it held.
        self._unheard: dict[int, Callable[[], None]] = {}
        self._early_acks: dict[int, int] = {}
        self.taken_over = False
        self._keepalive = keepalive
        self._clean_start = clean_start
        self._state = "new"  # new -> running -> stopped
        self._stopping = False
        self._lock = threading.Lock()  # guards _subs, _by_sid, _next_sid, _subacks
        self._subs: dict[str, _Sub] = {}
        self._by_sid: dict[int, _Sub] = {}
        self._next_sid = 1
        self._subacks: dict[int, _SubackWaiter] = {}
        self._counts_lock = threading.Lock()
        self._counts = {
            "messages_in": 0,
            "messages_out": 0,
            "handler_errors": 0,
            "callback_errors": 0,
            "reconnects": 0,
            "dropped": 0,
            "publish_refused": 0,  # PUBACK >= 0x80, e.g. denied by the ACL
            "publish_unrouted": 0,  # PUBACK 0x10: no subscriber, the server dropped it
            "certificate_refused": 0,  # reconnects the server refused at the TLS handshake
        }
        self._local = threading.local()  # .in_callback: are we on the network thread?
        self._connack = threading.Event()
        self._connack_reason: Any = None
        self._connack_props: Any = None
        self._last_socket_error = ""
        self._tls_refusal = ""
        self._refusals = LogThrottle()
        self._attempt = 0

        c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5,
            reconnect_on_failure=True,
        )
        # Our callbacks already catch everything; this keeps the network thread alive
        # even if a bug slips into one of them.
        c.suppress_exceptions = True
        c.max_inflight_messages_set(MAX_INFLIGHT)
        c.max_queued_messages_set(MAX_QUEUED)
        if self.url.tls:
            c.tls_set_context(tls.context() if tls else _system_tls_context())
        if will is not None:
            c.will_set(check_topic(will.topic), bytes(will.payload), will.qos, will.retain)
        self._connect_props: FastProperties | None = None
        if session_expiry_s:
            self._connect_props = _properties(PacketTypes.CONNECT)
            self._connect_props.SessionExpiryInterval = int(session_expiry_s)
        c.on_socket_open = self._guard(self._on_socket_open)
        c.on_connect = self._guard(self._on_connect)
        c.on_connect_fail = self._guard(self._on_connect_fail)
        c.on_disconnect = self._guard(self._on_disconnect)
        c.on_message = self._guard(self._on_message)
        c.on_subscribe = self._guard(self._on_subscribe)
        c.on_publish = self._guard(self._on_publish)
        # Lazy %-formatting through logging; on_log (which formats every packet's debug
        # line) is only installed while start() needs it.
        # paho wants a logging.Logger and only ever calls its .log(): _PahoLog is that.
        c.enable_logger(_PahoLog(self._claim_paho_error))  # type: ignore[arg-type]
        self._client = c

    # ---------------------------------------------------------------- public API

    @property
    def connected(self) -> bool:
        return self._client.is_connected()

    @property
    def counters(self) -> dict[str, int]:
        """A snapshot: messages_in/out, handler_errors, callback_errors, reconnects, dropped,
        publish_refused, publish_unrouted, certificate_refused."""
        with self._counts_lock:
            return dict(self._counts)

    def start(self, timeout: float = 10.0) -> Self:
        """Connect and wait for the CONNACK, retrying transient failures until ``timeout``.

        Raises ConfigError if the server refuses us for a reason retrying cannot fix
        (credentials, authorization, TLS certificates) and TransportError if no
        connection is made in time. Returns self, so ``bus = Bus(...).start()`` works.
        """
        if self._state == "running":
            return self
        if self._state == "stopped":
            raise TransportError(f"MQTT client {self.client_id} was stopped; make a new Bus")
        deadline = time.monotonic() + timeout
        jitter = wait_random_exponential(multiplier=0.05, max=2.0)

        def wait(state: RetryCallState) -> float:
            # Never sleep past the deadline: the caller asked for an answer by then.
            return max(0.0, min(jitter(state), deadline - time.monotonic()))

        retrying = Retrying(
            retry=retry_if_exception_type(_Transient),
            wait=wait,
            stop=lambda _state: time.monotonic() >= deadline,
            reraise=True,
        )
        self._client.on_log = self._guard(self._on_log)
        try:
            for attempt in retrying:
                with attempt:
                    self._handshake(deadline)
        except _Transient as exc:
            self._close_quietly()
            raise TransportError(
                f"cannot connect to MQTT broker {self.url} as {self.client_id} "
                f"within {timeout:g} s: {exc}"
            ) from None
        except ConfigError:
            self._close_quietly()
            raise
        finally:
            self._client.on_log = None
        # The first connect's re-subscriptions and hook run here, on the caller's thread,
        # before paho's thread exists; later ones run on that thread (see _on_connect).
        self._state = "running"
        # As on the network thread, a subscribe() from the hook must not wait for a
        # SUBACK: nothing reads it until loop_start().
        self._local.in_callback = True
        try:
            self._after_connect()
        finally:
            self._local.in_callback = False
        self._client.loop_start()
        return self

    def subscribe(
        self, filter: str, handler: Handler, qos: int = 1, *, timeout: float | None = 5.0
    ) -> None:
        """Call ``handler(message)`` for every message matching ``filter``.

        ``filter`` may use ``+``/``#`` and ``$share/<group>/<filter>``. Subscribing the
        same filter again replaces its handler. Before ``start()`` or while disconnected
        the subscription is made on the next connect. When connected, waits up to
        ``timeout`` s for the SUBACK (not when called from a handler or hook) so that a
        publish that follows is seen; raises TransportError if none comes (the
        subscription stays registered and is retried on reconnect) and ConfigError if the
        server refuses it.
        """
        match = match_filter(filter)
        if qos not in (0, 1, 2):
            raise ValueError(f"bad QoS {qos!r}: use 0, 1 or 2")
        if self._state == "stopped":
            raise TransportError(f"MQTT client {self.client_id} is stopped: cannot subscribe")
        with self._lock:
            old = self._subs.get(filter)
            sid = old.sid if old else self._new_sid()
            sub = _Sub(filter, match, qos, handler, sid)
            self._subs[filter] = sub
            self._by_sid[sid] = sub
        if not self.connected:
            return  # made by _after_connect on the next CONNACK
        waiter = self._send_subscribe(sub)
        if waiter is None or timeout is None or getattr(self._local, "in_callback", False):
            return  # on the network thread the SUBACK cannot arrive while we wait
        if not waiter.done.wait(timeout):
            raise TransportError(f"no SUBACK for {filter!r} from {self.url} within {timeout:g} s")
        if waiter.refusal is not None:
            raise ConfigError(f"{self.url} refused the subscription {filter!r}: {waiter.refusal}")

    def unsubscribe(self, filter: str) -> None:
        """Stop delivering ``filter`` (no-op if not subscribed); does not wait for UNSUBACK."""
        with self._lock:
            sub = self._subs.pop(filter, None)
            if sub is not None:
                self._by_sid.pop(sub.sid, None)
        if sub is not None and self.connected:
            self._client.unsubscribe(filter)

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        user_properties: Iterable[tuple[str, str]] = (),
        expiry_s: int | None = None,
        on_unheard: Callable[[], None] | None = None,
    ) -> int | None:
        """Queue a message; never waits for the network. Returns its MQTT packet id, or
        None for a QoS 0 message dropped while disconnected.

        ``on_unheard()`` runs if the server acknowledges this QoS 1 message with 0x10
        (NO_SUBSCRIBERS): it had nobody to give it to, and dropped it. It runs on the
        network thread, or on this one if the acknowledgement came first; it must not
        block.

        QoS 1/2 messages published while disconnected are sent after the reconnect; QoS 0
        ones are dropped (counted as ``dropped``). Raises TransportError if the bus is not
        running or too many messages are unacknowledged, ValueError on a bad topic.
        A QoS 1 PUBACK only means the broker has the message, not that anyone got it.
        """
        if self._state != "running":
            state = "stopped" if self._state == "stopped" else "not started"
            raise TransportError(f"MQTT client {self.client_id} is {state}: cannot publish")
        check_topic(topic)
        if isinstance(payload, str):
            raise TypeError("payload must be bytes; encode the str first")
        props: FastProperties | None = None
        user_properties = tuple(user_properties)
        if response_topic or correlation is not None or user_properties or expiry_s is not None:
            props = _properties(PacketTypes.PUBLISH)
            if response_topic:
                props.ResponseTopic = check_topic(response_topic)
            if correlation is not None:
                props.CorrelationData = bytes(correlation)
            if user_properties:
                props.UserProperty = [(str(k), str(v)) for k, v in user_properties]
            if expiry_s is not None:
                props.MessageExpiryInterval = int(expiry_s)
        try:
            info = self._client.publish(topic, bytes(payload), qos, retain, props)
        except ValueError as exc:  # paho's checks: QoS, payload size
            raise ValueError(f"cannot publish to {topic!r}: {exc}") from None
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise TransportError(
                f"MQTT client {self.client_id}: {MAX_QUEUED} messages unacknowledged by "
                f"{self.url}; the broker is unreachable or too slow"
            )
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos == 0:
            self._count("dropped")
            log.debug("%s: disconnected, dropped QoS 0 message to %s", self.client_id, topic)
            return None
        self._count("messages_out")
        if on_unheard is not None and qos > 0:
            with self._counts_lock:
                code = self._early_acks.pop(info.mid, None)
                if code is None:
                    self._unheard[info.mid] = on_unheard
            if code == NO_SUBSCRIBERS:
                on_unheard()
        return int(info.mid)

    def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` until the server has acknowledged every QoS 1/2
        message published so far; whether it has. Call it before ``stop()`` when the
        last messages matter (a broker's final answers, an agent's death)."""
        end = time.monotonic() + timeout_s
        # paho keeps each QoS 1/2 message here until its PUBACK/PUBCOMP.
        while self._client._out_messages:
            if time.monotonic() >= end or not self.connected:
                return False
            time.sleep(0.01)
        return True

    def stop(self) -> None:
        """Disconnect cleanly (the server discards the will) and end the network thread.

        Unacknowledged messages are dropped (``flush`` first to keep them). Idempotent.
        """
        if self._state != "running":
            self._state = "stopped"
            return
        self._state = "stopped"
        self._stopping = True
        # DISCONNECT with reason 0 tells the server to discard the will.
        self._client.disconnect()
        self._client.loop_stop()

    def abort(self) -> None:
        """Drop the connection without a DISCONNECT, as a crash would: the server then
        publishes the will. For tests. Idempotent."""
        if self._state != "running":
            self._state = "stopped"
            return
        self._state = "stopped"
        self._stopping = True
        # Park paho's reconnect wait so its loop cannot reconnect before loop_stop lands.
        self._client.reconnect_delay_set(3600, 3600)
        sock = self._client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                # socket.socket's own shutdown even for an SSLSocket: send a bare FIN
                # without a TLS close_notify, and without racing the network thread's
                # use of the SSL object.
                # (paho types the socket as its own union; it is a socket.socket here.)
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # type: ignore[arg-type]
        # Now that nothing more can be written, disconnect() only marks the client as
        # disconnecting, which ends paho's loop without its reconnect wait (that wait
        # checks the stop flag once a second).
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Bus({self.url}, {self.client_id!r}, {self._state}, connected={self.connected})"

    # ---------------------------------------------------------------- connecting

    def _handshake(self, deadline: float) -> None:
        """One connect attempt on the caller's thread: TCP (+TLS), CONNECT, CONNACK."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Transient("timed out")
        self._connack.clear()
        self._connack_reason = self._connack_props = None
        self._last_socket_error = self._tls_refusal = ""
        self._close_quietly()
        c = self._client
        c.connect_timeout = max(0.1, min(5.0, remaining))
        try:
            c.connect(
                self.url.host,
                self.url.port,
                self._keepalive,
                clean_start=self._clean_start,
                properties=self._connect_props,
            )
        except ssl.SSLCertVerificationError as exc:
            raise ConfigError(
                f"TLS: cannot verify the certificate of {self.url}: {exc.verify_message} "
                "(check TlsFiles.ca and that the certificate names this host)"
            ) from None
        except ssl.SSLError as exc:
            if _is_certificate_problem(str(exc)):
                raise ConfigError(f"TLS handshake with {self.url} refused: {exc}") from None
            raise _Transient(f"TLS: {exc}") from None
        except socket.gaierror as exc:
            if exc.errno == socket.EAI_NONAME:
                raise ConfigError(f"unknown broker host {self.url.host!r}: {exc}") from None
            raise _Transient(str(exc)) from None
        except OSError as exc:
            raise _Transient(str(exc) or type(exc).__name__) from None
        self._pump_until_connack(deadline)
        reason = self._connack_reason
        if reason is None:
            error = self._tls_refusal or self._last_socket_error
            self._close_quietly()
            if error and _is_certificate_problem(error):
                raise ConfigError(f"TLS: {self.url} refused this client: {error}")
            if time.monotonic() >= deadline:
                raise _Transient("no CONNACK before the deadline")
            raise _Transient(f"connection closed before CONNACK {error}".strip())
        if reason.is_failure:
            self._close_quietly()
            hint = _CONFIG_REFUSALS.get(reason.value)
            if hint is not None:
                raise ConfigError(
                    f"{self.url} refused client {self.client_id}: {_reason_name(reason)}; {hint}"
                )
            raise _Transient(f"refused: {_reason_name(reason)}")
        server_max = getattr(self._connack_props, "ReceiveMaximum", None)
        if server_max is not None and server_max < c.max_inflight_messages:
            # paho cannot change its window on an open connection and does not read the
            # server's limit itself, so reconnect once with the server's value.
            log.info(
                "%s: server Receive Maximum is %d; reconnecting with that window",
                self.client_id,
                server_max,
            )
            c.disconnect()
            c.max_inflight_messages_set(server_max)
            self._handshake(deadline)

    def _pump_until_connack(self, deadline: float) -> None:
        # paho's own loop() would create a wake-up socketpair that loop_start() later
        # replaces without closing; reading and writing directly avoids that leak.
        c = self._client
        while not self._connack.is_set():
            sock = c.socket()
            remaining = deadline - time.monotonic()
            if sock is None or remaining <= 0:
                return
            pending = sock.pending() if isinstance(sock, ssl.SSLSocket) else 0
            if not pending:
                wl = [sock] if c.want_write() else []
                readable, writable, _ = select.select([sock], wl, [], min(remaining, 0.1))
            else:
                readable, writable = [sock], []
            if writable and c.loop_write() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return
            if readable and c.loop_read() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return
            c.loop_misc()

    def _close_quietly(self) -> None:
        # Also marks a failed attempt's client as disconnected: paho refuses to change
        # connect_timeout (or the in-flight window) until then.
        with contextlib.suppress(Exception):
            self._client.disconnect()

    def _after_connect(self) -> None:
        # Subscriptions first, then the hook: a birth message published by the hook then
        # follows the SUBSCRIBEs on the wire, so replies to it cannot miss them.
        with self._lock:
            subs = list(self._subs.values())
        for sub in subs:
            self._send_subscribe(sub)
        if self._hook is not None:
            try:
                self._hook()
            except Exception:
                self._count("handler_errors")
                log.exception("%s: on_connect hook failed", self.client_id)

    def _send_subscribe(self, sub: _Sub) -> _SubackWaiter | None:
        props = _properties(PacketTypes.SUBSCRIBE)
        # Mosquitto sends one copy of a message per matching subscription, each tagged
        # with that subscription's identifier; dispatching by identifier runs each
        # handler exactly once per copy meant for it (topic matching would run it for
        # every overlapping subscription's copy).
        props.SubscriptionIdentifier = sub.sid
        waiter = _SubackWaiter(sub)
        # Hold the lock across subscribe() so the SUBACK cannot be handled before the
        # waiter is registered.
        with self._lock:
            rc, mid = self._client.subscribe(
                sub.filter, options=SubscribeOptions(qos=sub.qos), properties=props
            )
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
                return None  # not connected: the next _after_connect makes it
            self._subacks[mid] = waiter
        return waiter

    def _new_sid(self) -> int:
        sid = self._next_sid
        self._next_sid = sid % _SUBSCRIPTION_ID_MAX + 1
        return sid

    def _count(self, name: str, n: int = 1) -> None:
        with self._counts_lock:
            self._counts[name] += n

    # ---------------------------------------------------------------- paho callbacks

    def _guard(self, fn: _F) -> _F:
        # An exception escaping a paho callback ends paho's network thread for good (no
        # more messages, no reconnects). Catch, log and count instead.
        def guarded(*args: Any) -> Any:
            outer = getattr(self._local, "in_callback", False)  # on_log nests in others
            self._local.in_callback = True
            try:
                return fn(*args)
            except Exception:
                self._count("callback_errors")
                log.exception("%s: error in MQTT callback %s", self.client_id, fn.__name__)
                return None
            finally:
                self._local.in_callback = outer

        guarded.__name__ = fn.__name__
        return guarded  # type: ignore[return-value]  # same call form as fn, as _F promises

    def _on_socket_open(self, client: Any, userdata: Any, sock: Any) -> None:
        # paho never sets TCP_NODELAY: with Nagle on, every small QoS 1 exchange stalls
        # behind a delayed ACK (88 ms instead of 0.4 ms per round trip, measured).
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._state == "new" and isinstance(sock, ssl.SSLSocket):
            self._await_tls_verdict(sock)

    def _await_tls_verdict(self, sock: ssl.SSLSocket) -> None:
        # In TLS 1.3 our side of the handshake ends before the server has checked our
        # certificate; a refusal comes as an alert a moment later. paho sends CONNECT at
        # once, and a server that closes with that CONNECT unread resets the connection,
        # losing the alert (measured: 27 of 30 tries saw only EOF), so start() would
        # retry until its timeout. On the first connect, wait for the server's first
        # records instead: session tickets if we were accepted, else the alert.
        if sock.version() != "TLSv1.3":
            return
        readable, _, _ = select.select([sock], [], [], TLS_VERDICT_WAIT_S)
        if not readable:
            return
        try:
            # An MQTT server sends nothing before CONNECT, so this consumes only TLS
            # records (tickets or an alert), never MQTT bytes.
            sock.recv(1)
        except ssl.SSLWantReadError:
            pass  # tickets only: accepted
        except ssl.SSLError as exc:
            self._tls_refusal = str(exc)  # paho's own later errors must not mask it

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._connack_reason = reason
        self._connack_props = props
        self._connack.set()
        if self._state != "running":
            return  # the first connect: start() handles the outcome
        if reason.is_failure:
            log.warning(
                "%s: %s refused reconnect: %s", self.client_id, self.url, _reason_name(reason)
            )
            return
        self._attempt = 0
        self._tls_refusal = ""
        self._count("reconnects")
        server_max = getattr(props, "ReceiveMaximum", None)
        if server_max is not None and server_max < client.max_inflight_messages:
            log.warning(
                "%s: server now allows %d unacknowledged messages, below our %d",
                self.client_id,
                server_max,
                client.max_inflight_messages,
            )
        log.info("%s: reconnected to %s", self.client_id, self.url)
        self._after_connect()

    def _schedule_reconnect(self, most_s: float = RECONNECT_MAX_S) -> None:
        if self._stopping or self.taken_over:
            return
        delay = _reconnect_delay(self._attempt, most_s)
        self._attempt += 1
        # paho waits its min_delay after a reset; setting min == max makes it wait exactly
        # our jittered delay (its type hints say int, but it only does arithmetic).
        self._client.reconnect_delay_set(delay, delay)  # type: ignore[arg-type]

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        log.debug("%s: reconnect to %s failed", self.client_id, self.url)
        self._schedule_reconnect()

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        from_server = getattr(flags, "is_disconnect_packet_from_server", False)
        if from_server and getattr(reason, "value", None) == SESSION_TAKEN_OVER:
            self._taken(client)
            return
        if self._state == "running" and not self._stopping and self._tls_refusal:
            self._certificate_refused()
            self._schedule_reconnect(REFUSED_MAX_S)
            return
        if self._state == "running" and not self._stopping:
            # Without a DISCONNECT from the server paho invents a reason code (0x80,
            # "Unspecified error") that would only mislead.
            why = (
                f"the server disconnected us: {_reason_name(reason)}"
                if from_server
                else "connection lost"
            )
            log.warning("%s: %s from %s; reconnecting", self.client_id, why, self.url)
        self._schedule_reconnect()

    def _claim_paho_error(self, text: str) -> bool:
        """Once running, a certificate refused at a reconnect is ours to report: kept for
        ``_on_disconnect``, which follows it (start() reports its own)."""
        if self._state == "running" and _is_certificate_problem(text):
            self._tls_refusal = text
            return True
        return False

    def _certificate_refused(self) -> None:
        # Revoked, expired, or the server's CRL lapsed (then every client is refused, and
        # a fleet that gave up would need every device restarted): keep retrying, backed
        # off, and say why once a minute instead of "connection lost" every time.
        self._count("certificate_refused")
        held = self._refusals.admit("certificate", time.monotonic() * 1000)
        if held is not None:
            log.error("%s: %s refuses our certificate (%s): it was revoked or has expired, "
                      "or the server's CRL is out of date (skyhop certs crl). Retrying every "
                      "%g s at most until it is accepted%s", self.client_id, self.url,
                      self._tls_refusal, REFUSED_MAX_S, LogThrottle.suffix(held))
        self._tls_refusal = ""

    def _taken(self, client: Any) -> None:
        self.taken_over = True
        client.reconnect_delay_set(3600, 3600)  # park paho's own reconnect
        log.error("%s: another client connected to %s with this client id (session taken "
                  "over); not reconnecting, or the two would evict each other forever: run "
                  "one process per name", self.client_id, self.url)
        if self._on_taken_over is not None:
            threading.Thread(target=self._on_taken_over, name="skyhop-taken-over",
                             daemon=True).start()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        # A PUBACK >= 0x80 is a refusal (0x87: the ACL denied it); the message is gone.
        if getattr(reason, "is_failure", False):
            self._count("publish_refused")
            log.warning("%s: a publish was refused by the server: %s", self.client_id,
                        _reason_name(reason))
        code = int(getattr(reason, "value", 0))
        if code == NO_SUBSCRIBERS:
            self._count("publish_unrouted")
        with self._counts_lock:
            hook = self._unheard.pop(mid, None)
            if hook is None:
                self._early_acks[mid] = code
                if len(self._early_acks) > EARLY_ACKS:  # ids with no hook: keep it bounded
                    del self._early_acks[next(iter(self._early_acks))]
        if hook is not None and code == NO_SUBSCRIBERS:
            hook()

    def _on_subscribe(
        self, client: Any, userdata: Any, mid: int, reasons: list[Any], props: Any
    ) -> None:
        refused = ", ".join(_reason_name(r) for r in reasons if r.is_failure)
        with self._lock:
            waiter = self._subacks.pop(mid, None)
            if waiter is None:
                return
            if refused and self._subs.get(waiter.sub.filter) is waiter.sub:
                # Forget it, or every reconnect would ask again and be refused again.
                del self._subs[waiter.sub.filter]
                self._by_sid.pop(waiter.sub.sid, None)
        if refused:
            waiter.refusal = refused
            log.error("%s: subscription %r refused: %s", self.client_id, waiter.sub.filter, refused)
        waiter.done.set()

    def _on_message(self, client: Any, userdata: Any, m: Any) -> None:
        try:
            topic = m.topic
        except UnicodeDecodeError:
            log.warning("%s: dropped a message whose topic is not UTF-8", self.client_id)
            return
        props = getattr(m, "properties", None)
        user = getattr(props, "UserProperty", None) or ()
        msg = Message(
            topic=topic,
            payload=bytes(m.payload),
            qos=m.qos,
            retain=bool(m.retain),
            response_topic=getattr(props, "ResponseTopic", None),
            correlation=getattr(props, "CorrelationData", None),
            user_properties=tuple((str(k), str(v)) for k, v in user),
            expiry_s=getattr(props, "MessageExpiryInterval", None),
        )
        self._count("messages_in")
        sids = getattr(props, "SubscriptionIdentifier", None)
        with self._lock:
            if sids:
                subs = [self._by_sid[s] for s in sids if s in self._by_sid]
            else:  # a server without subscription identifiers
                subs = [s for s in self._subs.values() if paho.topic_matches_sub(s.match, topic)]
        for sub in subs:
            try:
                sub.handler(msg)
            except Exception:
                self._count("handler_errors")
                log.exception(
                    "%s: handler for %r failed on a message to %s",
                    self.client_id,
                    sub.filter,
                    topic,
                )

    def _on_log(self, client: Any, userdata: Any, level: int, text: str) -> None:
        # Only during start(): paho reports a socket error read before the CONNACK only
        # here, and a TLS alert among them (TLS 1.3 "certificate required" arrives after
        # the handshake) is a ConfigError, not a reason to retry until the timeout.
        if level == paho.MQTT_LOG_ERR:
            self._last_socket_error = text
