"""Requests the broker has accepted and not yet answered. Pure.

This is where "exactly one terminal reply" is kept: a request leaves the tracker
once — by its reply, by its deadline, or by a named error — and a late or duplicate
reply for an id no longer here finds nothing to complete. The dispatcher
(``dispatch.py``) is its only writer.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Request:
    """What the lifecycle reads of one request (its clear routing header), and ``ref``:
    the shell's own (the live broker's envelope and reply route; the simulated request)."""

    id: str
    model: str
    size: int  # sealed body bytes
    budget_ms: float
    priority: int = 0
    origin: str = ""  # one client's requests are one stream (placement's hysteresis)
    ref: Any = None


@dataclass(slots=True)
class Pending:
    request: Request
    accepted_ms: float  # the broker's monotonic clock
    deadline_ms: float
    seq: int = 0  # acceptance order: work is rescued in it
    node: str | None = None  # the node holding it now, if any
    dispatched_ms: float = 0.0
    attempt: int = 0
    tried: frozenset[str] = frozenset()

    def remaining_ms(self, now_ms: float) -> float:
        return self.deadline_ms - now_ms


class Tracker:
    def __init__(self) -> None:
        self._pending: dict[str, Pending] = {}
        self._by_node: dict[str, dict[str, Pending]] = {}
        self._deadlines: list[tuple[float, str]] = []  # lazy heap: stale ids are skipped
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._pending

    def __iter__(self) -> Iterator[Pending]:
        return iter(list(self._pending.values()))

    def get(self, request_id: str) -> Pending | None:
        return self._pending.get(request_id)

    def accept(self, pending: Pending) -> None:
        pending.seq = next(self._seq)
        self._pending[pending.request.id] = pending
        heapq.heappush(self._deadlines, (pending.deadline_ms, pending.request.id))

    def assign(self, request_id: str, node: str, now_ms: float) -> Pending:
        p = self._pending[request_id]
        self.unassign(p)
        p.node, p.dispatched_ms = node, now_ms
        p.attempt += 1
        p.tried = p.tried | {node}
        self._by_node.setdefault(node, {})[request_id] = p
        return p

    def unassign(self, p: Pending) -> str | None:
        """Take ``p`` off its node; returns that node (None if it held none)."""
        node, p.node = p.node, None
        if node is not None:
            self._forget(node, p.request.id)
        return node

    def _forget(self, node: str, request_id: str) -> None:
        held = self._by_node.get(node)
        if held is not None:
            held.pop(request_id, None)
            if not held:
                del self._by_node[node]

    def complete(self, request_id: str) -> Pending | None:
        """Remove and return the request, or None if it was already answered. It keeps
        its ``node``, so that the caller can give that node its credit back."""
        p = self._pending.pop(request_id, None)
        if p is not None and p.node is not None:
            self._forget(p.node, request_id)
        return p

    def on_node(self, node: str) -> list[Pending]:
        """Requests now waiting on ``node`` (to re-place when it dies), oldest first."""
        return sorted(self._by_node.get(node, {}).values(), key=lambda p: p.seq)

    def overdue(self, now_ms: float) -> list[Pending]:
        """Remove and return requests whose deadline is at or before ``now_ms``."""
        due: list[Pending] = []
        while self._deadlines and self._deadlines[0][0] <= now_ms:
            _, request_id = heapq.heappop(self._deadlines)
            p = self.complete(request_id)
            if p is not None:
                due.append(p)
        return due
