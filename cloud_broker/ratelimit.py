"""A token bucket per sender at the broker: each client's requests (keyed by reply
topic), each node's status and load (keyed by node id). Pure.

    limiter = RateLimiter(rate_per_s=50, burst=100)
    if not limiter.allow(reply_topic, now_ms):   # one client is one reply topic
        refuse OVERLOADED

A sender may send ``burst`` messages at once, then ``rate_per_s`` on average. Without
it one client's flood takes the whole fleet from the others (docs/security.md). The
buckets of the ``max_clients`` most recent senders are kept; an older one starts full.
"""

from __future__ import annotations

from collections import OrderedDict

from skyhop.errors import ConfigError


class RateLimiter:
    def __init__(self, rate_per_s: float, burst: float, max_clients: int = 10_000) -> None:
        if rate_per_s <= 0 or burst < 1 or max_clients < 1:
            raise ConfigError(
                f"rate limit needs rate > 0, burst >= 1 and max_clients >= 1, got "
                f"{rate_per_s}, {burst}, {max_clients}"
            )
        self.rate_per_ms = rate_per_s / 1000
        self.burst = burst
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at

    def allow(self, client: str, now_ms: float) -> bool:
        """Take one token from ``client``'s bucket if it has one."""
        tokens, then = self._buckets.pop(client, (self.burst, now_ms))
        tokens = min(self.burst, tokens + max(0.0, now_ms - then) * self.rate_per_ms)
        allowed = tokens >= 1
        self._buckets[client] = (tokens - allowed, now_ms)  # most recent last
        if len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return allowed
