"""An agent killed mid-request (SIGKILL: its MQTT will fires): every accepted request
still ends with exactly one reply — re-dispatched while the budget allows, else a
named error."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest

from skyhop.client import Client
from skyhop.errors import ErrorCode, RemoteError
from skyhop.localstack import LocalStack
from skyhop.messages import NodeStatus
from skyhop.mqtt import Bus, Message
from skyhop.topics import Topics
from tests.integration.fleet import SLOW_SIDE, make_home

pytestmark = pytest.mark.integration
X = {"x": np.ones((SLOW_SIDE, SLOW_SIDE), np.float32) / SLOW_SIDE}


class ReplyCounter:
    """Counts every reply published on a client's reply topic, by correlation."""

    def __init__(self, url: str, topic: str) -> None:
        self.counts: Counter[bytes] = Counter()
        self._lock = threading.Lock()
        self.bus = Bus(url, f"reply-counter-{time.monotonic_ns()}")
        self.bus.subscribe(topic, self._on, qos=1)
        self.bus.start()

    def _on(self, msg: Message) -> None:
        with self._lock:
            self.counts[msg.correlation or b""] += 1


@pytest.fixture
def fleet(mosquitto, tmp_path) -> Iterator[tuple[LocalStack, Client, ReplyCounter]]:  # type: ignore[no-untyped-def]
    home = make_home(tmp_path)
    with LocalStack(home, mosquitto.url, tmp_path / "logs") as st:
        st.broker()
        topics = Topics(home.config().prefix)
        with Client(mosquitto.url, home.fleet_public(), topics=topics) as client:
            counter = ReplyCounter(mosquitto.url, client.reply_topic)
            yield st, client, counter
            counter.bus.stop()


def _outcomes(futures: list) -> Counter[str]:  # type: ignore[type-arg]
    out: Counter[str] = Counter()
    for f in futures:
        try:
            f.result(timeout=30)
            out["OK"] += 1
        except RemoteError as exc:
            out[str(exc.code)] += 1
    return out


def test_work_of_a_killed_agent_is_redispatched(fleet) -> None:  # type: ignore[no-untyped-def]
    stack, client, counter = fleet
    stack.agent("edge-1", ["slow"])
    stack.agent("edge-2", ["slow"])
    stack.wait_live(["edge-1", "edge-2"])
    futures = [client.submit("slow", X, budget_ms=20_000) for _ in range(60)]
    time.sleep(0.15)  # both agents are busy with a queue of ~0.5 s each
    stack.kill("edge-1")
    outcomes = _outcomes(futures)
    assert outcomes == {"OK": 60}
    time.sleep(0.5)  # a second reply, if any, would arrive by now
    assert sorted(counter.counts.values()) == [1] * 60
    wheres = Counter(f.result().header.node for f in futures)
    print("served by", dict(wheres))
    assert wheres["edge-2"] > wheres["edge-1"]  # edge-2 finished edge-1's queue
    log = (stack.log_dir / "broker.log").read_text()
    assert "node edge-1 went offline" in log


def test_no_node_left_means_a_named_error_not_silence(fleet) -> None:  # type: ignore[no-untyped-def]
    stack, client, counter = fleet
    stack.agent("solo", ["slow"])
    stack.wait_live(["solo"])
    futures = [client.submit("slow", X, budget_ms=20_000) for _ in range(60)]
    time.sleep(0.15)
    started = time.monotonic()
    stack.kill("solo")
    outcomes = _outcomes(futures)
    assert time.monotonic() - started < 10  # answered on the will, not at the 20 s budget
    assert outcomes["OK"] + outcomes[ErrorCode.UNAVAILABLE] == 60
    assert outcomes[ErrorCode.UNAVAILABLE] >= 1
    time.sleep(0.5)
    assert sorted(counter.counts.values()) == [1] * 60


def test_fleet_recovers_after_the_mqtt_server_restarts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from skyhop.mosquitto import MosquittoProcess

    home = make_home(tmp_path)
    topics = Topics(home.config().prefix)
    image = {"image": np.zeros((1, 64), np.float32)}
    with MosquittoProcess.start() as server, LocalStack(home, server.url, tmp_path / "logs") as st:
        st.broker()
        st.agent("edge-1", ["digits"])
        st.wait_live(["edge-1"])
        server.restart()  # retained state is gone (no persistence): births must be re-sent
        with Client(server.url, home.fleet_public(), topics=topics) as client:
            deadline = time.monotonic() + 20
            while True:  # the first requests may find the broker still reconnecting
                try:
                    result = client.infer("digits", image, budget_ms=2000)
                    break
                except RemoteError:
                    assert time.monotonic() < deadline, "fleet did not recover in 20 s"
                    time.sleep(0.2)
        assert result.header.node == "edge-1"
        births: list[NodeStatus] = []
        with Bus(server.url, "birth-reader") as reader:  # retained: only a re-sent birth shows
            reader.subscribe(
                topics.status("edge-1"), lambda m: births.append(NodeStatus.decode(m.payload))
            )
            time.sleep(0.5)
        assert births and births[-1].online
