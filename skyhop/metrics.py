"""Prometheus metrics through ``prometheus-client``: one registry per process, every
metric declared once with its HELP text, so that a scrape, a dashboard and a test all
read the same catalog.

    CATALOG = {
        "requests_total": counter("Requests answered, by code.", "code"),
        "latency_seconds": histogram("End-to-end latency.", "model"),
        "pending_requests": gauge("Requests not yet answered."),
    }
    metrics = Metrics("skyhop_broker", CATALOG)
    metrics.inc("requests_total", code="OK")
    metrics.observe("latency_seconds", 0.012, model="digits")
    metrics.read("pending_requests", lambda: len(tracker))   # read at scrape time

A gauge's reader returns a number, or ``{(label values...): number}`` for a labelled
one. Counters and histograms are written by the process as things happen; gauges are
read when Prometheus asks, so a scrape costs the process nothing between scrapes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("skyhop.metrics")
# The `_created` series doubles every counter's series for a timestamp nobody charts.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
# From a fast edge model (1 ms) to a slow cloud job that fills a long budget (30 s).
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                     5.0, 10.0, 30.0)

GaugeReading = float | Mapping[tuple[str, ...], float]


@dataclass(frozen=True, slots=True)
class Spec:
    kind: str  # counter, gauge or histogram
    help: str
    labels: tuple[str, ...] = ()


def counter(help: str, *labels: str) -> Spec:
    return Spec("counter", help, labels)


def gauge(help: str, *labels: str) -> Spec:
    return Spec("gauge", help, labels)


def histogram(help: str, *labels: str) -> Spec:
    return Spec("histogram", help, labels)


def exported_names(namespace: str, catalog: Mapping[str, Spec]) -> set[str]:
    """Every series name a scrape can show: what a dashboard's queries may name."""
    names: set[str] = set()
    for name, spec in catalog.items():
        full = f"{namespace}_{name}"
        names.add(full)
        if spec.kind == "histogram":
            names.update(f"{full}_{part}" for part in ("bucket", "sum", "count"))
    return names


class Metrics:
    def __init__(self, namespace: str, catalog: Mapping[str, Spec]) -> None:
        self.namespace = namespace
        self.catalog = dict(catalog)
        self.registry = CollectorRegistry()
        self._counters: dict[str, Counter] = {}
        self._histograms: dict[str, Histogram] = {}
        self._readers: dict[str, Callable[[], GaugeReading]] = {}
        for name, spec in self.catalog.items():
            full = f"{namespace}_{name}"
            if spec.kind == "counter":
                # The client adds `_total` back on exposition.
                self._counters[name] = Counter(full.removesuffix("_total"), spec.help,
                                               spec.labels, registry=self.registry)
            elif spec.kind == "histogram":
                self._histograms[name] = Histogram(full, spec.help, spec.labels,
                                                   buckets=LATENCY_BUCKETS_S,
                                                   registry=self.registry)
        self.registry.register(_Gauges(self))
        for name, c in self._counters.items():
            if not self.catalog[name].labels:
                c.inc(0)  # scraped as 0 rather than missing, so rate() has a start

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        c = self._counters[name]
        (c.labels(**labels) if labels else c).inc(amount)

    def observe(self, name: str, value: float, **labels: str) -> None:
        h = self._histograms[name]
        (h.labels(**labels) if labels else h).observe(value)

    def read(self, name: str, reader: Callable[[], GaugeReading]) -> None:
        """Bind the gauge ``name`` (declared in the catalog) to a reader."""
        if self.catalog[name].kind != "gauge":
            raise ValueError(f"{name} is a {self.catalog[name].kind}, not a gauge")
        self._readers[name] = reader

    def get(self, name: str, **labels: str) -> float:
        """A counter's value (0 if never counted): for status documents and tests."""
        value = self.registry.get_sample_value(f"{self.namespace}_{name}", labels)
        return value or 0.0

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Gauges(Collector):
    """The catalog's gauges, each read from its reader at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def describe(self) -> Iterator[Metric]:
        return iter(())  # families are only known at scrape time

    def collect(self) -> Iterator[Metric]:
        m = self._m
        for name, reader in sorted(m._readers.items()):
            spec = m.catalog[name]
            family = GaugeMetricFamily(f"{m.namespace}_{name}", spec.help, labels=spec.labels)
            try:
                reading = reader()
            except Exception:  # one broken reader must not cost the whole scrape
                log.exception("reading gauge %s failed", name)
                continue
            if isinstance(reading, Mapping):
                for values, v in reading.items():
                    family.add_metric(list(values), float(v))
            else:
                family.add_metric([], float(reading))
            yield family
