"""Refusing replays: a seen-id cache bounded by time (docs/protocol.md §Replay).

A request is accepted once, and only while it is fresh: ``sent_at_ms`` no more than
``window_ms`` ahead of the receiver's clock, and no older than ``window_ms`` plus the
request's own budget (a job may legitimately start late in a long budget). Each id
is remembered until it could no longer pass the age rule, plus one window for clock
steps, so within that time the cache decides and after it the age rule does. Pure:
the caller passes ``now_ms``.
"""

from __future__ import annotations

import heapq

from skyhop.errors import ErrorCode, ProtocolError


class ReplayGuard:
    def __init__(self, window_ms: float = 60_000.0, max_ids: int = 1_000_000) -> None:
        self.window_ms = window_ms
        self.max_ids = max_ids  # memory bound; past it the soonest-forgotten ids go first
        self._forget_at: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def check(
        self, request_id: str, sent_at_ms: float, now_ms: float, budget_ms: float = 0.0
    ) -> None:
        """Record ``request_id``; raise ProtocolError(REPLAYED) if it is not fresh."""
        self._prune(now_ms)
        age = now_ms - sent_at_ms
        if age > self.window_ms + budget_ms or -age > self.window_ms:
            raise ProtocolError(
                ErrorCode.REPLAYED,
                f"sent_at_ms is {age:.0f} ms from our clock, outside the replay window "
                f"({self.window_ms:.0f} ms + budget); check the client's clock (NTP)",
            )
        if request_id in self._forget_at:
            raise ProtocolError(ErrorCode.REPLAYED, f"request id {request_id} was already seen")
        forget_at = sent_at_ms + budget_ms + 2 * self.window_ms
        self._forget_at[request_id] = forget_at
        heapq.heappush(self._heap, (forget_at, request_id))

    def seen(self, request_id: str) -> bool:
        return request_id in self._forget_at

    def _prune(self, now_ms: float) -> None:
        while self._heap and (self._heap[0][0] < now_ms or len(self._heap) > self.max_ids):
            _, request_id = heapq.heappop(self._heap)
            del self._forget_at[request_id]
