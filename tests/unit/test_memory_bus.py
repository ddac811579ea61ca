"""``MemoryBus``: the in-memory MQTT server and clients that unit tests can use."""

from __future__ import annotations

import paho.mqtt.client as paho
from hypothesis import given
from hypothesis import strategies as st

from skyhop.mqtt.memory import MemoryBus, MemoryServer
from skyhop.mqtt.message import Message, Will, matches

LEVEL = st.sampled_from(["a", "b", "", "$x"])


@given(st.lists(st.sampled_from(["a", "b", "+", ""]), min_size=1, max_size=4),
       st.booleans(), st.lists(LEVEL, min_size=1, max_size=5))
def test_topic_matching_is_pahos(levels: list[str], hash_end: bool, topic: list[str]) -> None:
    filt = "/".join(levels + (["#"] if hash_end else []))
    name = "/".join(topic)
    assert matches(filt, name) == paho.topic_matches_sub(filt, name)


def test_retained_shared_and_will() -> None:
    server = MemoryServer()
    got: dict[str, list[Message]] = {"a": [], "b": [], "watch": []}
    a, b = MemoryBus(server, "a"), MemoryBus(server, "b")
    watch = MemoryBus(server, "watch")
    node = MemoryBus(server, "node", will=Will("s/node/status", b"dead"))
    for bus in (a, b):
        bus.subscribe("$share/g/req/+", got[bus.client_id].append)
        bus.start()
    node.start()
    node.publish("s/node/status", b"alive", retain=True)
    for i in range(4):
        node.publish("req/m", bytes([i]), correlation=b"c")
    server.pump()
    assert [m.payload for m in got["a"]] == [b"\x00", b"\x02"]  # round robin in the group
    assert [m.payload for m in got["b"]] == [b"\x01", b"\x03"]
    watch.subscribe("s/+/status", got["watch"].append)
    watch.start()
    server.pump()
    assert [(m.payload, m.retain) for m in got["watch"]] == [(b"alive", True)]
    node.abort()  # a crash: the will is published
    node2 = MemoryBus(server, "node2", will=Will("s/node2/status", b"dead"))
    node2.start()
    node2.stop()  # a clean stop: no will
    server.pump()
    assert [m.payload for m in got["watch"]][1:] == [b"dead"]
    assert server.retained["s/node/status"].payload == b"dead"


def test_a_handler_that_publishes_is_not_reentered_and_a_bug_costs_one_message() -> None:
    server = MemoryServer()
    bus = MemoryBus(server, "x")
    seen: list[bytes] = []

    def echo(msg: Message) -> None:
        seen.append(msg.payload)
        if msg.payload == b"boom":
            raise RuntimeError("a bug")
        if len(seen) < 3:
            bus.publish("t", msg.payload + b"!")

    bus.subscribe("t", echo)
    bus.start()
    bus.publish("t", b"boom")
    bus.publish("t", b"hi")
    assert server.pump() == 3
    assert seen == [b"boom", b"hi", b"hi!"] and bus.counters["handler_errors"] == 1
