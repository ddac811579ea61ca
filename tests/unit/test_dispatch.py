"""The request lifecycle against the agent's own queue, back to back: no MQTT, no clock.

As h11's ``ConnectionPair`` joins two protocol objects, ``Pair`` joins the broker's
``Dispatcher`` to one ``WorkQueue`` per node: a ``Send`` is pushed onto that node's
queue, and the test decides when a node runs its next job, refuses, dies or goes
quiet. Every request must end with exactly one ``Answer``.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_broker.dispatch import (
    NODE_LOST,
    UNDELIVERED,
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
from cloud_broker.fleet import Fleet
from cloud_broker.tracker import Request
from edge_agent.workqueue import WorkQueue
from skyhop.errors import ErrorCode, ProtocolError
from skyhop.protocol.messages import OK, NodeStatus
from tests.unit.test_placement import NOW, add, report

GRACE = 250.0


class Pair:
    """A dispatcher and the nodes it sends to, each an agent's ``WorkQueue``."""

    def __init__(self, nodes: dict[str, float], *, capacity: int = 8,
                 timeout_ms: float = 5_000.0) -> None:
        self.d = Dispatcher(Fleet(timeout_ms), DispatchConfig(reply_grace_ms=GRACE),
                            random.Random(1))
        self.queues = {n: WorkQueue(capacity) for n in nodes}
        self.actions: list[object] = []
        for n, rtt in nodes.items():
            add(self.d.fleet, n, rtt=rtt, capacity=capacity)

    def act(self, actions: list[object]) -> list[object]:
        """Deliver each Send to its node's queue, as the agent would (OVERLOADED if full)."""
        self.actions += actions
        for a in actions:
            if isinstance(a, Send):
                try:
                    self.queues[a.node].push(a.pending.request.id, NOW + a.remaining_ms, NOW,
                                             a.pending.request)
                except ProtocolError as exc:
                    self.reply(a.pending.request.id, a.node, exc.code)
        return actions

    def request(self, rid: str, budget: float = 100.0, now: float = NOW) -> list[object]:
        return self.act(self.d.accept(Request(rid, "m", 1000, budget), now))

    def run(self, node: str, now: float = NOW) -> str | None:
        """The node runs its next job and replies OK; returns the request id."""
        job, expired = self.queues[node].pop(now)
        for late in expired:
            self.reply(late.request_id, node, ErrorCode.DEADLINE_EXCEEDED, now)
        if job is None:
            return None
        self.reply(job.request_id, node, OK, now)
        return job.request_id

    def reply(self, rid: str, node: str, status: str, now: float = NOW) -> list[object]:
        return self.act(self.d.reply(Reply(rid, status, node, "edge", 0.0, 1.0, 100), now))

    def die(self, node: str, now: float = NOW) -> list[object]:
        self.queues[node] = WorkQueue(8)  # the process is gone, and its queue with it
        return self.act(self.d.node_status(NodeStatus(node=node, online=False, session=1), now))

    def answers(self) -> Counter[str]:
        """Request id -> how many Answers it got."""
        return Counter(a.pending.request.id for a in self.actions if isinstance(a, Answer))

    def answer(self, rid: str) -> Answer:
        (a,) = [a for a in self.actions if isinstance(a, Answer) and a.pending.request.id == rid]
        return a


def test_a_result_is_forwarded_once_and_a_second_reply_is_late() -> None:
    pair = Pair({"e1": 2.0})
    (send,) = pair.request("r1")
    assert isinstance(send, Send) and send.node == "e1" and send.attempt == 1
    assert pair.run("e1") == "r1"
    answer = pair.answer("r1")
    assert answer.code == OK and answer.forward and answer.where == "edge"
    assert pair.reply("r1", "e1", OK) == [LateReply("r1")]
    assert len(pair.d) == 0 and pair.answers() == {"r1": 1}


def test_an_overloaded_node_is_left_for_another() -> None:
    pair = Pair({"e1": 1.0, "e2": 5.0})
    (send,) = pair.request("r1")
    first = send.node
    other = ({"e1", "e2"} - {first}).pop()
    actions = pair.reply("r1", first, ErrorCode.OVERLOADED)
    assert isinstance(actions[0], Redispatch) and actions[0].reason == ErrorCode.OVERLOADED
    assert isinstance(actions[1], Send) and actions[1].node == other
    assert actions[1].attempt == 2
    assert pair.run(other) == "r1" and pair.answers() == {"r1": 1}


def test_with_every_node_tried_the_answer_is_the_last_refusal() -> None:
    pair = Pair({"e1": 1.0}, capacity=1)
    pair.request("r1")
    pair.request("r2")  # e1's queue is full: it refuses, and nothing else can take it
    assert pair.answer("r2").code == ErrorCode.OVERLOADED
    assert not pair.answer("r2").forward and len(pair.d) == 1


def test_a_lost_nodes_work_is_placed_again_or_answered_past_its_deadline() -> None:
    pair = Pair({"e1": 1.0, "e2": 5.0})
    for rid in ("a", "b", "c"):
        pair.request(rid, budget=100.0)
    held = {a.pending.request.id: a.node for a in pair.actions if isinstance(a, Send)}
    lost = held["a"]
    other = ({"e1", "e2"} - {lost}).pop()
    on_lost = sorted(rid for rid, n in held.items() if n == lost)
    actions = pair.die(lost, now=NOW + 10)
    assert isinstance(actions[0], NodeDown) and actions[0].session == 1
    rescued = [a for a in actions if isinstance(a, Redispatch)]
    assert [a.pending.request.id for a in rescued] == on_lost  # oldest first
    assert all(a.reason == NODE_LOST for a in rescued)
    assert {a.node for a in actions if isinstance(a, Send)} == {other}
    while pair.run(other, now=NOW + 20):
        pass
    assert pair.answers() == {"a": 1, "b": 1, "c": 1}
    assert all(pair.answer(r).code == OK for r in "abc")


def test_work_lost_after_its_deadline_is_answered_deadline_exceeded() -> None:
    pair = Pair({"e1": 1.0})
    pair.request("r1", budget=50.0)
    pair.die("e1", now=NOW + 60)
    answer = pair.answer("r1")
    assert answer.code == ErrorCode.DEADLINE_EXCEEDED and "lost" in answer.message


def test_no_reply_is_answered_after_the_grace_and_the_late_result_dropped() -> None:
    pair = Pair({"e1": 1.0})
    pair.request("r1", budget=50.0)
    assert pair.act(pair.d.tick(NOW + 50 + GRACE - 1)) == []  # the reply may be on the wire
    (answer,) = pair.act(pair.d.tick(NOW + 50 + GRACE))
    assert isinstance(answer, Answer) and answer.code == ErrorCode.DEADLINE_EXCEEDED
    assert "from node e1" in answer.message
    pair.run("e1", now=NOW + 10)  # the node was only slow: its result is late
    assert isinstance(pair.actions[-1], LateReply) and pair.answers() == {"r1": 1}


def test_a_silent_node_is_lost_at_the_timeout_but_keeps_what_it_holds() -> None:
    """Silence is not death: the work stays with the node (moved, it could run twice
    once a cut link comes back); its reply still ends it, else its deadline does."""
    pair = Pair({"e1": 1.0, "e2": 1.0}, timeout_ms=1_000)
    (send,) = pair.request("r1", budget=5_000)
    pair.request("r2", budget=5_000)
    actions = pair.act(pair.d.tick(NOW + 1_001))
    assert {a.node for a in actions if isinstance(a, NodeDown)} == {"e1", "e2"}
    assert all(a.session is None for a in actions if isinstance(a, NodeDown))
    assert not [a for a in actions if isinstance(a, Send | Answer)]  # neither moved nor ended
    assert pair.run(send.node, now=NOW + 1_500) == "r1"  # the link came back: its result
    assert pair.answer("r1").code == OK
    pair.act(pair.d.tick(NOW + 5_000 + GRACE))
    assert pair.answer("r2").code == ErrorCode.DEADLINE_EXCEEDED
    assert pair.answers() == {"r1": 1, "r2": 1}


def test_work_nobody_received_moves_at_once_and_its_node_takes_no_more() -> None:
    """PUBACK 0x10 on a work message: its node is not connected, nothing ran."""
    pair = Pair({"e1": 1.0, "e2": 50.0})
    (send,) = pair.request("r1", budget=1_000)
    assert send.node == "e1"
    pair.queues["e1"] = WorkQueue(8)  # the server dropped it: e1 never had it
    (moved, again) = pair.act(pair.d.undelivered("r1", "e1", NOW + 5))
    assert isinstance(moved, Redispatch) and moved.reason == UNDELIVERED
    assert isinstance(again, Send) and again.node == "e2"
    (other,) = pair.request("r2", budget=1_000, now=NOW + 6)
    assert isinstance(other, Send) and other.node == "e2"  # e1 waits for its next report
    assert pair.act(pair.d.undelivered("r2", "e1", NOW + 7)) == []  # not e1's: untouched
    report(pair.d.fleet, "e1", at=NOW + 500, seq=9)  # it reports: back in the fleet
    assert pair.d.fleet.is_live(pair.d.fleet.nodes["e1"], NOW + 500)


def test_the_will_of_a_node_already_silent_moves_its_work() -> None:
    pair = Pair({"e1": 1.0, "e2": 50.0}, timeout_ms=1_000)
    (send,) = pair.request("r1", budget=60_000)
    assert send.node == "e1"
    report(pair.d.fleet, "e2", rtt=50.0, capacity=8, at=NOW + 900, seq=9)  # e1 is silent
    pair.act(pair.d.tick(NOW + 1_001))
    (redispatch, again) = pair.die("e1", now=NOW + 1_200)
    assert isinstance(redispatch, Redispatch) and redispatch.reason == NODE_LOST
    assert isinstance(again, Send) and again.node == "e2"


def test_a_result_from_the_node_it_left_ends_it_and_an_error_from_there_is_dropped() -> None:
    pair = Pair({"e1": 1.0, "e2": 5.0})
    (send,) = pair.request("r1")
    old = send.node
    pair.act(pair.d.node_lost(old, NOW + 1))  # its process exited, as far as we know
    assert pair.reply("r1", old, ErrorCode.BAD_REQUEST) == [LateReply("r1")]
    (answer,) = pair.reply("r1", old, OK)
    assert isinstance(answer, Answer) and answer.code == OK and answer.forward
    new = ({"e1", "e2"} - {old}).pop()
    assert pair.d.fleet.nodes[new].outstanding == 0  # its credit came back with the answer
    assert pair.run(new) == "r1" and pair.answers() == {"r1": 1}


def test_close_answers_everything_left() -> None:
    pair = Pair({"e1": 1.0})
    for rid in ("a", "b"):
        pair.request(rid)
    answers = pair.act(pair.d.close(ErrorCode.UNAVAILABLE, "stopping", NOW + 1))
    assert [a.code for a in answers] == [ErrorCode.UNAVAILABLE] * 2
    assert len(pair.d) == 0 and pair.d.fleet.nodes["e1"].outstanding == 0


def test_an_online_status_is_a_node_up() -> None:
    pair = Pair({"e1": 1.0})
    status = NodeStatus(node="e2", online=True, session=1, models=("m",))
    assert pair.d.node_status(status, NOW) == [NodeUp(status)]


def test_an_empty_pool_counts_what_nothing_could_take_as_cloud_demand() -> None:
    d = Dispatcher(Fleet(5_000), DispatchConfig(pool_models=frozenset({"m"})), random.Random(1))
    d.fleet.known_models.add("m")
    (answer,) = d.accept(Request("r1", "m", 10, 50.0), NOW)
    assert isinstance(answer, Answer) and answer.code == ErrorCode.UNAVAILABLE
    assert d.demand.take()["m"].cloud_wanted == 1
    d.pool_ready = 1  # a ready worker is in the fleet's reach: placement speaks for it
    d.accept(Request("r2", "m", 10, 50.0), NOW)
    assert d.demand.take()["m"].cloud_wanted == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["request", "run", "die", "tick", "overload"]),
                          st.integers(0, 2)), max_size=60))
def test_every_request_gets_exactly_one_answer(steps: list[tuple[str, int]]) -> None:
    nodes = ["e1", "e2", "e3"]
    pair = Pair(dict.fromkeys(nodes, 2.0), capacity=2)
    now, ids = NOW, []
    for step, i in steps:
        now += 7
        node = nodes[i]
        if step == "request":
            ids.append(f"r{len(ids)}")
            pair.request(ids[-1], budget=40.0, now=now)
        elif step == "run":
            pair.run(node, now)
        elif step == "die" and node in pair.d.fleet.nodes:
            pair.die(node, now)
        elif step == "overload":
            job, _ = pair.queues[node].pop(now)
            if job is not None:
                pair.reply(job.request_id, node, ErrorCode.OVERLOADED, now)
        pair.act(pair.d.tick(now))
    pair.act(pair.d.tick(now + 40 + GRACE))  # every deadline has passed
    assert pair.answers() == dict.fromkeys(ids, 1)
    assert len(pair.d) == 0
    assert all(v.outstanding == 0 for v in pair.d.fleet.nodes.values())


def test_an_unknown_model_is_answered_at_once() -> None:
    pair = Pair({"e1": 1.0})
    (answer,) = pair.act(pair.d.accept(Request("r1", "other", 10, 50.0), NOW))
    assert isinstance(answer, Answer) and answer.code == ErrorCode.UNKNOWN_MODEL


@pytest.mark.parametrize("status", [ErrorCode.BAD_REQUEST, ErrorCode.DEADLINE_EXCEEDED])
def test_a_holders_error_is_its_answer(status: ErrorCode) -> None:
    pair = Pair({"e1": 1.0})
    pair.request("r1")
    (answer,) = pair.reply("r1", "e1", status)
    assert isinstance(answer, Answer) and answer.code == status and answer.forward
