"""Refusing replays: a seen-id cache bounded by a time window (docs/protocol.md §Replay).

A request is accepted once, and only while its ``sent_at_ms`` lies within ``window_ms``
of the receiver's clock. Inside the window the id cache decides; outside it the
request is refused, since its id may already have left the cache. Pure: the caller
passes ``now_ms``.
"""

from __future__ import annotations

from collections import OrderedDict

from skyhop.errors import ErrorCode, ProtocolError


class ReplayGuard:
    def __init__(self, window_ms: float = 60_000.0, max_ids: int = 1_000_000) -> None:
        self.window_ms = window_ms
        self.max_ids = max_ids
        self._seen: OrderedDict[str, float] = OrderedDict()  # id -> time first seen

    def check(self, request_id: str, sent_at_ms: float, now_ms: float) -> None:
        """Record ``request_id``; raise ProtocolError(REPLAYED) if it is not fresh."""
        self._prune(now_ms)
        if abs(now_ms - sent_at_ms) > self.window_ms:
            raise ProtocolError(
                ErrorCode.REPLAYED,
                f"sent_at_ms is {now_ms - sent_at_ms:.0f} ms from our clock, outside the "
                f"{self.window_ms:.0f} ms replay window (check the client's clock: NTP)",
            )
        if request_id in self._seen:
            raise ProtocolError(ErrorCode.REPLAYED, f"request id {request_id} was already seen")
        self._seen[request_id] = now_ms

    def seen(self, request_id: str) -> bool:
        return request_id in self._seen

    def _prune(self, now_ms: float) -> None:
        # Ids leave in arrival order; keep each for two windows so a clock step cannot
        # readmit one that is still inside the window.
        horizon = now_ms - 2 * self.window_ms
        while self._seen and (
            next(iter(self._seen.values())) < horizon or len(self._seen) > self.max_ids
        ):
            self._seen.popitem(last=False)
