"""Dynamic batching's pure core: the curve, the admission rule, and what carries them."""

from __future__ import annotations

import random

import pytest

from cloud_broker.fleet import NodeView
from edge_agent.workqueue import WorkQueue
from skyhop.batching import BatchPoint, BatchTimes, admit, amortised, batch_ms, bucket, curve
from skyhop.errors import ProtocolError
from skyhop.protocol.messages import LoadReport, ModelLoad, NodeStatus
from skyhop.stats import ServiceTime

# A model whose batch of k runs in 2 + 0.5 (k - 1) ms: batching pays.
POINTS = (BatchPoint(1, 2.0, 2.4, 50), BatchPoint(2, 2.5, 3.0, 20),
          BatchPoint(4.5, 3.75, 4.5, 10), BatchPoint(8, 5.5, 6.6, 5))


def test_sizes_fall_in_power_of_two_buckets() -> None:
    assert [bucket(k) for k in (1, 2, 3, 4, 7, 8, 15, 16, 256)] == [1, 2, 3, 4, 4, 8, 8, 16, 256]
    times = BatchTimes()
    for k, ms in ((1, 2.0), (4, 3.5), (6, 4.5), (8, 5.5)):
        times.observe(k, ms)
    points = times.points()
    assert [p.size for p in points] == [1, 5, 8]  # 4 and 6 share the 4-7 bucket
    assert [p.count for p in points] == [1, 2, 1]


def test_the_curve_interpolates_and_assumes_no_gain_it_did_not_measure() -> None:
    assert batch_ms(POINTS, 1) == 2.4
    assert batch_ms(POINTS, 2, p95=False) == 2.5
    assert batch_ms(POINTS, 3, p95=False) == pytest.approx(2.5 + 1.25 * 0.4)
    assert batch_ms(POINTS, 16, p95=False) == pytest.approx(5.5 * 2)  # linear past 8
    assert batch_ms(POINTS, 0.5) == 2.4  # never faster than the smallest seen
    assert batch_ms((), 4) == 0.0
    assert amortised(POINTS, 1) == 1.0
    assert amortised(POINTS, 8) == pytest.approx(5.5 / 16)
    assert amortised(POINTS, 32) == pytest.approx(5.5 / 16)  # no more than at 8
    assert amortised((BatchPoint(1, 2.0, 2.0, 1),), 8) == 1.0  # nothing learnt: no gain


def test_the_lone_run_comes_from_the_service_estimator_until_measured() -> None:
    alone = ServiceTime(prior_ms=3.0)  # the warm-up run
    times = BatchTimes()
    assert curve(times, alone) == (BatchPoint(1, 3.0, 3.0, 0),)
    times.observe(4, 5.0)
    assert [p.size for p in curve(times, alone)] == [1, 4]
    times.observe(1, 2.0)
    assert curve(times, alone)[0] == BatchPoint(1, 2.0, 2.0, 1)


def _predict(k: int) -> float:
    return batch_ms(POINTS, k) / 1000


def test_admit_takes_what_meets_every_deadline() -> None:
    loose = [(1.0, 1)] * 20
    assert admit(0.0, loose, _predict, 16) == 16  # rows bound it
    assert admit(0.0, loose, _predict, 256) == 20
    assert admit(0.0, [(1.0, 3), (1.0, 3), (1.0, 3)], _predict, 7) == 2
    assert admit(0.0, [], _predict, 8) == 0
    tight = [(0.0035, 1)] * 10  # 3.5 ms: a batch of 2 (p95 3.0) fits, of 3 (3.6) not
    assert admit(0.0, tight, _predict, 16) == 2


def test_a_request_doomed_alone_does_not_stop_a_batch_for_the_others() -> None:
    doomed = [(0.001, 1)] + [(1.0, 1)] * 5  # 1 ms: no run meets it
    assert admit(0.0, doomed, _predict, 16) == 6


@pytest.mark.parametrize("seed", range(20))
def test_batching_never_costs_a_request_a_deadline_it_met_alone(seed: int) -> None:
    rng = random.Random(seed)
    now = rng.uniform(0, 10)
    queued = sorted((now + rng.uniform(0.0, 0.012), rng.randint(1, 3)) for _ in range(30))
    n = admit(now, queued, _predict, 32)
    assert n >= 1
    assert sum(rows for _, rows in queued[:n]) <= 32 or n == 1
    done, alone = now + _predict(n), now + _predict(1)
    for deadline, _ in queued[:n]:
        assert done <= deadline or alone > deadline


def test_the_queue_gives_a_batch_only_from_the_head_of_the_line() -> None:
    q = WorkQueue(10)
    for i, model in enumerate("aabab"):
        q.push(f"r{i}", deadline=10.0 + i, now=0.0, payload=model)
    head, _ = q.pop(0.0)
    assert head is not None
    more, expired = q.take(0.0, lambda j: j.payload == "a", 8)
    assert [j.request_id for j in more] == ["r1"]  # stops at r2, a "b" due earlier than r3
    assert expired == []
    q.put_back(more)
    assert [q.pop(0.0)[0].request_id for _ in range(4)] == ["r1", "r2", "r3", "r4"]


def test_put_back_ignores_capacity_and_take_reports_expired_jobs() -> None:
    q = WorkQueue(2)
    a = q.push("a", 5.0, 0.0, "m")
    q.push("b", 1.0, 0.0, "m")
    head, _ = q.pop(0.0)
    q.push("c", 6.0, 0.0, "m")
    q.put_back([head])  # 3 held in a queue of 2: it was accepted once
    assert len(q) == 3
    more, expired = q.take(2.0, lambda j: True, 5)
    assert [j.request_id for j in expired] == ["b"]
    assert more[0] is a


def test_a_load_report_carries_the_curve_and_stays_as_it_was_without_one() -> None:
    with_curve = LoadReport(node="n", session=1, seq=1, queue=0, in_flight=0, capacity=1,
                            rtt_ms=0.0, models={"m": ModelLoad(2.0, 2.4, 50, POINTS)})
    assert LoadReport.decode(with_curve.encode()) == with_curve
    plain = LoadReport(node="n", session=1, seq=1, queue=0, in_flight=0, capacity=1,
                       rtt_ms=0.0, models={"m": ModelLoad(2.0, 2.4, 50)})
    assert "batches" not in plain.to_dict()["models"]["m"]  # old peers read it as before
    assert LoadReport.decode(plain.encode()) == plain


@pytest.mark.parametrize("bad", [
    [[1, 2.0, 2.0]],  # three numbers
    [[2, 2.0, 2.0, 1], [1, 1.0, 1.0, 1]],  # not by growing size
    [[0.5, 1.0, 1.0, 1]],  # a batch smaller than one request
    [[1, 1.0, 1.0, 1]] * 33,  # too long
    "1,2,3",
])
def test_a_malformed_curve_is_a_named_error(bad: object) -> None:
    raw = {"node": "n", "session": 1, "seq": 1, "queue": 0, "in_flight": 0, "capacity": 1,
           "rtt_ms": 0.0, "v": 1,
           "models": {"m": {"mean_ms": 1.0, "p95_ms": 1.0, "count": 1, "batches": bad}}}
    with pytest.raises(ProtocolError, match=r"batches|batch size"):
        LoadReport.from_dict(raw)


def _view(batches: tuple[BatchPoint, ...]) -> NodeView:
    status = NodeStatus(node="n", online=True, session=1, models=("m",), concurrency=1)
    view = NodeView("n", status)
    view.apply(LoadReport(node="n", session=1, seq=1, queue=8, in_flight=1, capacity=64,
                          rtt_ms=0.0, models={"m": ModelLoad(2.0, 2.4, 50, batches)}))
    return view


def test_the_broker_expects_a_batching_node_to_drain_its_queue_faster() -> None:
    alone = _view(())
    batching = _view(POINTS)
    # Nine ahead, one slot: 9 lone runs of 2 ms, or batches of up to 8 at 5.5 / 8 each,
    # plus the longer run of the batch ours joins.
    assert alone.wait_ms("m") == pytest.approx(18.0)
    expected = 18.0 * 5.5 / 16 + batch_ms(POINTS, 8) - batch_ms(POINTS, 1)
    assert batching.wait_ms("m") == pytest.approx(expected)
    assert batching.wait_ms("m") < alone.wait_ms("m")
