"""Requests the broker has accepted and not yet answered. Pure.

This is where "exactly one terminal reply" is kept: a request leaves the tracker
once — by its reply, by its deadline, or by a named error — and a late or duplicate
reply for an id no longer here is dropped by the shell.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass, field

from skyhop.messages import RequestHeader


@dataclass
class Pending:
    header: RequestHeader
    envelope: bytes
    reply_topic: str
    correlation: bytes | None
    accepted_ms: float  # broker monotonic clock
    deadline_ms: float
    node: str | None = None
    dispatched_ms: float = 0.0
    attempt: int = 0
    tried: set[str] = field(default_factory=set)

    def remaining_ms(self, now_ms: float) -> float:
        return self.deadline_ms - now_ms


class Tracker:
    def __init__(self) -> None:
        self._pending: dict[str, Pending] = {}
        self._deadlines: list[tuple[float, str]] = []  # lazy heap: stale ids are skipped

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._pending

    def __iter__(self) -> Iterator[Pending]:
        return iter(list(self._pending.values()))

    def accept(self, pending: Pending) -> None:
        self._pending[pending.header.id] = pending
        heapq.heappush(self._deadlines, (pending.deadline_ms, pending.header.id))

    def assign(self, request_id: str, node: str, now_ms: float) -> Pending:
        p = self._pending[request_id]
        p.node, p.dispatched_ms = node, now_ms
        p.attempt += 1
        p.tried.add(node)
        return p

    def complete(self, request_id: str) -> Pending | None:
        """Remove and return the request, or None if it was already answered."""
        return self._pending.pop(request_id, None)

    def on_node(self, node: str) -> list[Pending]:
        """Requests now waiting on ``node`` (to re-place when it dies)."""
        return [p for p in self._pending.values() if p.node == node]

    def overdue(self, now_ms: float) -> list[Pending]:
        """Remove and return requests whose deadline is at or before ``now_ms``."""
        due: list[Pending] = []
        while self._deadlines and self._deadlines[0][0] <= now_ms:
            _, request_id = heapq.heappop(self._deadlines)
            p = self._pending.pop(request_id, None)
            if p is not None:
                due.append(p)
        return due
