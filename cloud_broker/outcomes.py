"""Recent outcomes of requests, per model, in time buckets: what the status page and
``/status`` show (SLO attainment over the last 1 and 10 minutes, latency over time,
edge/cloud split, errors by code). Pure: the broker feeds it under its lock.

Memory is bounded whatever the rate: ``keep_s / bucket_s`` buckets per model, each with
counts and at most ``SAMPLE`` latencies (every k-th one, k doubling as the bucket
fills, so a bucket's percentiles come from a spread over its whole span).
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from skyhop.stats import percentile

SAMPLE = 256


@dataclass(slots=True)
class Bucket:
    start_s: float
    requests: int = 0
    met: int = 0
    edge: int = 0
    cloud: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    _stride: int = 1

    def add(self, code: str, latency_ms: float, met: bool, where: str) -> None:
        self.requests += 1
        self.met += met
        self.edge += where == "edge"
        self.cloud += where == "cloud"
        self.codes[code] += 1
        if code == "OK" and self.requests % self._stride == 0:
            self.latencies.append(latency_ms)
            if len(self.latencies) >= SAMPLE:
                del self.latencies[::2]
                self._stride *= 2


@dataclass(frozen=True, slots=True)
class Outcome:
    model: str
    code: str
    latency_ms: float
    budget_ms: float
    where: str  # edge, cloud, or "" (the broker's own error)

    @property
    def met(self) -> bool:
        return self.code == "OK" and self.latency_ms <= self.budget_ms


class Outcomes:
    def __init__(self, bucket_s: float = 5.0, keep_s: float = 600.0) -> None:
        self.bucket_s = bucket_s
        self.keep = max(1, round(keep_s / bucket_s))
        self._models: dict[str, deque[Bucket]] = {}
        self.errors: deque[dict[str, Any]] = deque(maxlen=20)  # the latest, newest last

    def record(self, now_s: float, o: Outcome, message: str = "") -> None:
        self._bucket(o.model, now_s).add(o.code, o.latency_ms, o.met, o.where)
        if o.code != "OK":
            self.errors.append({"t": round(now_s, 3), "model": o.model, "code": o.code,
                                "message": message})

    def _bucket(self, model: str, now_s: float) -> Bucket:
        start = now_s - now_s % self.bucket_s
        buckets = self._models.setdefault(model, deque(maxlen=self.keep))
        if not buckets or buckets[-1].start_s < start:
            buckets.append(Bucket(start))
        return buckets[-1]

    def _recent(self, model: str, now_s: float, span_s: float) -> list[Bucket]:
        since = now_s - span_s
        return [b for b in self._models.get(model, ()) if b.start_s + self.bucket_s > since]

    def models(self) -> list[str]:
        return sorted(self._models)

    def summary(self, model: str, now_s: float, span_s: float) -> dict[str, Any]:
        """Requests, SLO attainment (None with no requests) and placements over the last
        ``span_s`` (to the bucket)."""
        bs = self._recent(model, now_s, span_s)
        n = sum(b.requests for b in bs)
        met = sum(b.met for b in bs)
        return {"requests": n, "met": met, "attainment": round(met / n, 4) if n else None,
                "edge": sum(b.edge for b in bs), "cloud": sum(b.cloud for b in bs)}

    def codes(self, now_s: float, span_s: float) -> dict[str, int]:
        """Non-OK replies by code over the last ``span_s``, every model together."""
        total: Counter[str] = Counter()
        for model in self._models:
            for b in self._recent(model, now_s, span_s):
                total.update({c: k for c, k in b.codes.items() if c != "OK"})
        return dict(sorted(total.items()))

    def series(self, model: str, now_s: float) -> list[dict[str, Any]]:
        """One point per bucket kept: what the page charts."""
        return [
            {"t": b.start_s, "requests": b.requests,
             "attainment": round(b.met / b.requests, 4) if b.requests else None,
             "p50_ms": _pct(b.latencies, 50), "p99_ms": _pct(b.latencies, 99),
             "edge": b.edge, "cloud": b.cloud}
            for b in self._recent(model, now_s, self.keep * self.bucket_s)
        ]


def _pct(latencies: list[float], q: float) -> float | None:
    return round(percentile(latencies, q), 2) if latencies else None
