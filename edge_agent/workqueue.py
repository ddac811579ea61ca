"""The agent's pure core: a bounded earliest-deadline-first queue and a result cache.

No threads and no clock here: the shell passes ``now`` (monotonic seconds) in and
wraps the queue in a condition variable.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
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


class ResultCache:
    """Recent replies by request id, so a duplicate is answered, never run twice.

    ``begin`` marks an id in progress; ``finish`` stores its reply. Bounded LRU.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._done: OrderedDict[str, bytes] = OrderedDict()
        self._running: set[str] = set()

    def lookup(self, request_id: str) -> tuple[bool, bytes | None]:
        """(seen, cached reply). Seen with no reply means the job is still in progress."""
        if request_id in self._running:
            return True, None
        reply = self._done.get(request_id)
        return reply is not None, reply

    def begin(self, request_id: str) -> None:
        self._running.add(request_id)

    def finish(self, request_id: str, reply: bytes) -> None:
        self._running.discard(request_id)
        if self.size == 0:
            return
        self._done[request_id] = reply
        self._done.move_to_end(request_id)
        while len(self._done) > self.size:
            self._done.popitem(last=False)
