"""Online estimators shared by the agent, the broker and the simulator. Pure."""

from __future__ import annotations

from collections import deque


class ServiceTime:
    """Mean (EWMA) and 95th percentile (over the last ``window`` samples) of a duration.

    An EWMA follows a drifting service time (thermal throttling, a co-tenant) while the
    windowed quantile keeps the tail honest; both are O(window) at worst per query.
    """

    def __init__(self, alpha: float = 0.2, window: int = 128, prior_ms: float | None = None):
        self.alpha = alpha
        self._recent: deque[float] = deque(maxlen=window)
        self.mean_ms = prior_ms or 0.0
        self.count = 0
        self._p95: float | None = None

    def observe(self, ms: float) -> None:
        self.mean_ms = ms if self.count == 0 else self.mean_ms + self.alpha * (ms - self.mean_ms)
        self.count += 1
        self._recent.append(ms)
        self._p95 = None

    @property
    def p95_ms(self) -> float:
        if not self._recent:
            return self.mean_ms
        if self._p95 is None:
            ordered = sorted(self._recent)
            self._p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        return self._p95


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in [0, 100]; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]
