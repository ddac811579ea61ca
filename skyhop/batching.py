"""Dynamic batching's pure core: the service time by batch size, and which queued
requests may share one run. The agent, the broker's placement and the simulator all
use these, so that the three agree on what a batching node can take.

    times = BatchTimes()
    times.observe(4, 3.1)                     # a batch of 4 requests ran in 3.1 ms
    points = times.points()                   # what the load report carries
    batch_ms(points, 8)                       # predicted p95 of a batch of 8
    admit(now, [(d0, 1), (d1, 1), (d2, 2)], lambda k: batch_ms(points, k), 16)

The size of a batch is the number of requests in it (each may carry several rows; the
model's ``max_batch`` bounds the rows). No threads and no clock: callers pass ``now``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise

from skyhop.stats import ServiceTime


@dataclass(frozen=True)
class BatchPolicy:
    """How one model batches at one node. ``max_batch`` is the most rows in one run
    (1: never batch); ``max_delay_ms`` how long a request may wait for company when
    fewer than a full batch are queued (0: batch only what is already waiting)."""

    max_batch: int = 1
    max_delay_ms: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.max_batch > 1


NO_BATCHING = BatchPolicy()


@dataclass(frozen=True)
class BatchPoint:
    """Measured service of the batches of one size bucket: their mean size, and the
    mean and 95th percentile of their run time."""

    size: float
    mean_ms: float
    p95_ms: float
    count: int


def bucket(size: int) -> int:
    """Sizes 1, 2, 3 apart; then one bucket per power of two (4-7, 8-15, …): telemetry
    stays short at max_batch 256, and the curve is smooth enough to interpolate."""
    return size if size < 4 else 1 << (size.bit_length() - 1)


class BatchTimes:
    """Run time of one model by batch size, learnt from its runs."""

    def __init__(self) -> None:
        self._times: dict[int, ServiceTime] = {}
        self._sizes: dict[int, list[int]] = {}  # bucket -> [batches, requests in them]

    def observe(self, size: int, ms: float) -> None:
        b = bucket(size)
        self._times.setdefault(b, ServiceTime()).observe(ms)
        seen = self._sizes.setdefault(b, [0, 0])
        seen[0] += 1
        seen[1] += size

    def points(self) -> tuple[BatchPoint, ...]:
        return tuple(
            BatchPoint(self._sizes[b][1] / self._sizes[b][0], t.mean_ms, t.p95_ms, t.count)
            for b, t in sorted(self._times.items())
        )


def curve(times: BatchTimes | None, alone: ServiceTime) -> tuple[BatchPoint, ...]:
    """Run time by batch size at one node: ``times``' points, with the lone run's from
    ``alone`` (the node's service estimator, which holds its warm-up run's time before
    any request ran) where ``times`` has none yet."""
    points = times.points() if times is not None else ()
    if points and points[0].size == 1:
        return points
    return (BatchPoint(1, alone.mean_ms, alone.p95_ms, alone.count), *points)


def batch_ms(points: Sequence[BatchPoint], size: float, *, p95: bool = True) -> float:
    """Predicted run time of a batch of ``size`` from measured ``points`` (by size).

    Between two measured sizes, a straight line; below the smallest, the smallest's time
    (a batch never runs faster for being smaller than one seen); above the largest, the
    largest's time per request times ``size``: no gain is assumed that was not measured.
    0.0 with no points.
    """
    if not points:
        return 0.0

    def pick(p: BatchPoint) -> float:
        return p.p95_ms if p95 else p.mean_ms

    if size <= points[0].size:
        return pick(points[0])
    for lo, hi in pairwise(points):
        if size <= hi.size:
            frac = (size - lo.size) / (hi.size - lo.size)
            return pick(lo) + frac * (pick(hi) - pick(lo))
    last = points[-1]
    return pick(last) * size / last.size


def amortised(points: Sequence[BatchPoint], size: float) -> float:
    """Run time per request in batches of ``size`` ÷ that of a request alone (≤ 1 where
    batching pays): how much faster a batching node drains a queue ``size`` deep."""
    alone = batch_ms(points, 1, p95=False)
    if alone <= 0 or size <= 1:
        return 1.0
    return min(1.0, batch_ms(points, size, p95=False) / (size * alone))


def admit(now: float, queued: Sequence[tuple[float, int]],
          predict: Callable[[int], float], max_rows: int) -> int:
    """How many of ``queued`` (deadline, rows), in run order, share the next run.

    The longest prefix whose rows fit ``max_rows`` and in which every member either
    meets its deadline in the batch's predicted time, or would miss it even alone
    (``predict(1)``): batching never costs a request a deadline it could have met.
    At least the first request always runs.
    """
    if not queued:
        return 0
    alone = now + predict(1)
    rows, n = queued[0][1], 1
    # The earliest deadline a member could meet alone binds the batch; those it could
    # not meet alone are lost either way.
    first = queued[0][0]
    binding = first if first >= alone else float("inf")
    while n < len(queued):
        deadline, more = queued[n]
        if rows + more > max_rows:
            break
        if deadline >= alone:
            binding = min(binding, deadline)
        if now + predict(n + 1) > binding:
            break
        rows += more
        n += 1
    return n
