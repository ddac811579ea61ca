"""The agent's pure core: a bounded earliest-deadline-first queue and a result cache.

No threads and no clock here: the shell passes ``now`` (monotonic seconds) in and
wraps the queue in a condition variable.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from skyhop.errors import ErrorCode, ProtocolError


@dataclass(order=True)
class Job:
    """One request waiting at the node. Ordered by deadline, then priority, then arrival."""

    deadline: float
    neg_priority: int
    seq: int
    request_id: str = field(compare=False)
    received: float = field(compare=False)
    payload: Any = field(compare=False)  # what the shell needs to run and reply


class WorkQueue:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._heap: list[Job] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def count(self, which: Callable[[Job], bool]) -> int:
        return sum(1 for job in self._heap if which(job))

    def push(
        self, request_id: str, deadline: float, now: float, payload: Any, priority: int = 0
    ) -> Job:
        """Queue a job; raise ProtocolError(OVERLOADED) when full."""
        if len(self._heap) >= self.capacity:
            raise ProtocolError(ErrorCode.OVERLOADED, f"queue full ({self.capacity} waiting)")
        job = Job(deadline, -priority, next(self._seq), request_id, now, payload)
        heapq.heappush(self._heap, job)
        return job

    def pop(self, now: float) -> tuple[Job | None, list[Job]]:
        """Return (next job to run or None, jobs whose deadline passed while queued)."""
        expired: list[Job] = []
        while self._heap:
            job = heapq.heappop(self._heap)
            if job.deadline <= now:
                expired.append(job)
            else:
                return job, expired
        return None, expired

    def take(self, now: float, same: Callable[[Job], bool],
             limit: int) -> tuple[list[Job], list[Job]]:
        """Up to ``limit`` more jobs in run order while ``same(job)`` holds (a batch for
        the job just popped), and the jobs found expired on the way. It stops at the
        first job that is not the same, so a batch never runs ahead of work due earlier.
        """
        taken: list[Job] = []
        expired: list[Job] = []
        while self._heap and len(taken) < limit:
            job = self._heap[0]
            if job.deadline <= now:
                expired.append(heapq.heappop(self._heap))
            elif same(job):
                taken.append(heapq.heappop(self._heap))
            else:
                break
        return taken, expired

    def put_back(self, jobs: Iterable[Job]) -> None:
        """Return taken jobs that did not join a batch, in their old places. They were
        accepted once, so capacity does not refuse them."""
        for job in jobs:
            heapq.heappush(self._heap, job)


Route = tuple[str, bytes | None]  # (reply topic, correlation data)


class ResultCache:
    """Recent replies by request id, so a duplicate is answered, never run twice.

    ``begin`` marks an id in progress with the route its reply takes; ``also`` adds a
    route for a job in progress (a surviving broker asking for a request whose first
    broker died, ADR 0010); ``finish`` stores the reply and returns those extra routes.
    Bounded LRU; safe to call from the MQTT thread and the workers at once.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._done: OrderedDict[str, bytes] = OrderedDict()
        self._running: dict[str, list[Route]] = {}
        self._lock = threading.Lock()

    def lookup(self, request_id: str) -> tuple[bool, bytes | None]:
        """(seen, cached reply). Seen with no reply means the job is still in progress."""
        with self._lock:
            if request_id in self._running:
                return True, None
            reply = self._done.get(request_id)
            return reply is not None, reply

    def begin(self, request_id: str, route: Route = ("", None)) -> None:
        with self._lock:
            self._running[request_id] = [route]

    def also(self, request_id: str, route: Route) -> bytes | None:
        """Send the reply of a job in progress to ``route`` too (a route it has already
        is left alone: a redelivered copy). If the job finished meanwhile, its reply."""
        with self._lock:
            routes = self._running.get(request_id)
            if routes is None:
                return self._done.get(request_id)
            if all(topic != route[0] for topic, _ in routes):
                routes.append(route)
            return None

    def finish(self, request_id: str, reply: bytes) -> list[Route]:
        """Store the reply; return the routes added by ``also``."""
        with self._lock:
            routes = self._running.pop(request_id, [])
            if self.size > 0:
                self._done[request_id] = reply
                self._done.move_to_end(request_id)
                while len(self._done) > self.size:
                    self._done.popitem(last=False)
            return routes[1:]
