"""An MQTT server and clients in memory, with ``Bus``'s surface, for unit tests.

    server = MemoryServer()
    broker = MemoryBus(server, "broker-1")
    agent = MemoryBus(server, "cam-7", will=Will("skyhop/v1/nodes/cam-7/status", b""))
    broker.subscribe("$share/brokers/skyhop/v1/req/+", handle)
    broker.start(); agent.start()
    agent.publish("skyhop/v1/req/digits", payload, response_topic="r/1")
    server.pump()                       # deliver until nothing is left to deliver

Publishing only queues; ``pump()`` delivers on the caller's thread, in publish order,
so a handler that publishes (as every skyhop handler does, under its own lock) is never
re-entered and a test decides when time passes. It keeps retained messages (an empty
retained payload clears one), shares ``$share/{group}/`` messages round robin among
the group, fires a client's will on ``abort()`` and not on ``stop()``, and counts
``messages_in``/``messages_out`` like ``Bus``. It does not model QoS, sessions, ACLs
or the network: tests of those use a real Mosquitto (tests/conftest.py).
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from types import TracebackType

from typing_extensions import Self  # typing.Self is 3.11+

from skyhop.errors import TransportError
from skyhop.mqtt.message import Handler, Message, Will, check_topic, match_filter, matches

log = logging.getLogger("skyhop.mqtt")

@dataclass
class _Sub:
    client: MemoryBus
    filter: str
    match: str
    group: str | None  # the $share group, if any
    handler: Handler


class MemoryServer:
    """The server the ``MemoryBus`` clients share."""

    def __init__(self) -> None:
        self.retained: dict[str, Message] = {}
        self._subs: list[_Sub] = []
        self._queue: deque[tuple[_Sub, Message]] = deque()
        self._turns: dict[tuple[str, str], itertools.count[int]] = {}

    def pump(self, limit: int = 100_000) -> int:
        """Deliver queued messages (and those their handlers publish); returns how many."""
        done = 0
        while self._queue and done < limit:
            sub, msg = self._queue.popleft()
            sub.client._deliver(sub, msg)
            done += 1
        return done

    def _publish(self, msg: Message) -> None:
        if msg.retain:
            if msg.payload:
                self.retained[msg.topic] = msg
            else:
                self.retained.pop(msg.topic, None)
        shared: dict[tuple[str, str], list[_Sub]] = {}
        for sub in self._subs:
            if not sub.client.connected or not matches(sub.match, msg.topic):
                continue
            if sub.group is None:
                self._queue.append((sub, replace(msg, retain=False)))
            else:
                shared.setdefault((sub.group, sub.match), []).append(sub)
        for key, members in shared.items():  # one member of each group gets it
            turn = next(self._turns.setdefault(key, itertools.count()))
            self._queue.append((members[turn % len(members)], replace(msg, retain=False)))

    def _subscribe(self, sub: _Sub) -> None:
        self._unsubscribe(sub.client, sub.filter)
        self._subs.append(sub)
        if sub.group is None:  # retained messages go to new plain subscribers only
            for msg in self.retained.values():
                if matches(sub.match, msg.topic):
                    self._queue.append((sub, msg))

    def _unsubscribe(self, client: MemoryBus, filt: str) -> None:
        self._subs = [s for s in self._subs if not (s.client is client and s.filter == filt)]


class MemoryBus:
    """One client of a ``MemoryServer``: ``Bus``'s methods, without a network."""

    def __init__(self, server: MemoryServer, client_id: str, *, will: Will | None = None,
                 on_connect: Callable[[], None] | None = None) -> None:
        self.server = server
        self.client_id = client_id
        self._will = will
        self._hook = on_connect
        self._state = "new"  # new -> running -> stopped
        self._filters: dict[str, _Sub] = {}
        self._counts = dict.fromkeys(("messages_in", "messages_out", "handler_errors"), 0)

    @property
    def connected(self) -> bool:
        return self._state == "running"

    @property
    def counters(self) -> dict[str, int]:
        return dict(self._counts)

    def start(self, timeout: float = 10.0) -> Self:
        self._state = "running"
        for sub in self._filters.values():
            self.server._subscribe(sub)
        if self._hook is not None:
            self._hook()
        return self

    def subscribe(self, filter: str, handler: Handler, qos: int = 1, *,
                  timeout: float | None = 5.0) -> None:
        match = match_filter(filter)
        group = filter.split("/", 2)[1] if filter.startswith("$share/") else None
        sub = _Sub(self, filter, match, group, handler)
        self._filters[filter] = sub
        if self.connected:
            self.server._subscribe(sub)

    def unsubscribe(self, filter: str) -> None:
        self._filters.pop(filter, None)
        self.server._unsubscribe(self, filter)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                response_topic: str | None = None, correlation: bytes | None = None,
                user_properties: Iterable[tuple[str, str]] = (),
                expiry_s: int | None = None) -> None:
        if self._state != "running":
            raise TransportError(f"MQTT client {self.client_id} is not running: cannot publish")
        msg = Message(check_topic(topic), bytes(payload), qos, retain, response_topic,
                      correlation, tuple(user_properties), expiry_s)
        self._counts["messages_out"] += 1
        self.server._publish(msg)

    def flush(self, timeout_s: float) -> bool:
        return True  # nothing is ever unacknowledged here

    def stop(self) -> None:
        """A clean disconnect: the will is discarded."""
        self._leave()

    def abort(self) -> None:
        """A crash: the server publishes the will."""
        if self.connected and self._will is not None:
            w = self._will
            self.server._publish(Message(w.topic, bytes(w.payload), w.qos, w.retain))
        self._leave()

    def _leave(self) -> None:
        for filt in list(self._filters):
            self.server._unsubscribe(self, filt)
        self._state = "stopped"

    def _deliver(self, sub: _Sub, msg: Message) -> None:
        if not self.connected or self._filters.get(sub.filter) is not sub:
            return  # left, or unsubscribed, since it was queued
        self._counts["messages_in"] += 1
        try:
            sub.handler(msg)
        except Exception:  # as Bus: a handler's bug costs one message, never the caller
            self._counts["handler_errors"] += 1
            log.exception("%s: handler for %r failed on a message to %s", self.client_id,
                          sub.filter, msg.topic)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
