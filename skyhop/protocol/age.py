"""How long a message waited on its way, without trusting two clocks to agree.

A sender stamps each message with its own clock; a receiver reads its own on arrival.
``recv - sent`` is the two clocks' offset plus this message's delay. The smallest such
difference seen from one source is the offset plus the quickest trip (the *base*), so
``(recv - sent) - base`` is how much longer this message took than the quickest one: the
time it sat in a client library's queue while disconnected, in the MQTT server's
queue, or in the socket of a process that was stopped (SIGSTOP, a long GC pause).
Only the clocks' *rates* must agree, as they do to parts per million; their settings
never need to (docs/adr/0002 holds). The same idea as LEDBAT's base delay (RFC 6817).

The base is the minimum over the current and the previous window of ``window_ms`` of
that source's own traffic, so a sender's clock stepped back heals within two windows,
while a source silent for a long time keeps its base for when it comes back.

A wait under ``tolerance_ms`` is the ordinary jitter of a busy machine or network and
reads as 0: budgets count from receipt (ADR 0002), and a request with a tiny budget
is told INFEASIBLE, not that it waited.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

WINDOW_MS = 30_000.0
TOLERANCE_MS = 50.0
MAX_SOURCES = 100_000  # beyond this, the least recently heard source is forgotten


@dataclass
class _Base:
    current: float
    previous: float
    since_ms: float  # when ``current`` began, on the receiver's clock


class Ages:
    def __init__(self, window_ms: float = WINDOW_MS, max_sources: int = MAX_SOURCES,
                 tolerance_ms: float = TOLERANCE_MS) -> None:
        self.window_ms = window_ms
        self.tolerance_ms = tolerance_ms
        self.max_sources = max_sources
        self._bases: OrderedDict[str, _Base] = OrderedDict()

    def age_ms(self, source: str, sent_ms: float, recv_ms: float) -> float:
        """How much longer than its source's quickest this message took (≥ 0). The first
        message from a source is its baseline: 0."""
        delta = recv_ms - sent_ms
        base = self._bases.pop(source, None)
        if base is None:
            base = _Base(delta, delta, recv_ms)
        elif recv_ms - base.since_ms >= self.window_ms:
            base = _Base(delta, base.current, recv_ms)
        else:
            base.current = min(base.current, delta)
        self._bases[source] = base  # most recently heard last
        if len(self._bases) > self.max_sources:
            self._bases.popitem(last=False)
        waited = delta - min(base.current, base.previous)
        return waited if waited >= self.tolerance_ms else 0.0

    def __len__(self) -> int:
        return len(self._bases)
