"""Prometheus text exposition for counters and gauges, with no dependency.

    metrics = Metrics("skyhop_broker")
    metrics.inc("requests_total", code="OK")
    metrics.gauge("pending", lambda: len(tracker))
    server = metrics.serve(9464)            # GET /metrics

Kept tiny on purpose: a scrape is a snapshot of a few dozen numbers.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LabelSet = tuple[tuple[str, str], ...]


class Metrics:
    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self._counters: defaultdict[tuple[str, LabelSet], float] = defaultdict(float)
        self._gauges: dict[str, Callable[[], dict[LabelSet, float] | float]] = {}
        self._lock = threading.Lock()

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        with self._lock:
            self._counters[(name, tuple(sorted(labels.items())))] += amount

    def get(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._counters.get((name, tuple(sorted(labels.items()))), 0.0)

    def gauge(self, name: str, read: Callable[[], dict[LabelSet, float] | float]) -> None:
        """Register a gauge read at scrape time: a number, or {labels: number}."""
        self._gauges[name] = read

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            counters = sorted(self._counters.items())
        seen: set[str] = set()
        for (name, labels), value in counters:
            full = f"{self.namespace}_{name}"
            if full not in seen:
                seen.add(full)
                lines.append(f"# TYPE {full} counter")
            lines.append(f"{full}{_labels(labels)} {value:g}")
        for name, read in sorted(self._gauges.items()):
            full = f"{self.namespace}_{name}"
            lines.append(f"# TYPE {full} gauge")
            reading = read()
            for labels, v in reading.items() if isinstance(reading, dict) else [((), reading)]:
                lines.append(f"{full}{_labels(labels)} {v:g}")
        return "\n".join(lines) + "\n"

    def serve(self, port: int, host: str = "127.0.0.1",
              ready: Callable[[], bool] = lambda: True) -> ThreadingHTTPServer:
        """Serve ``/metrics`` on a daemon thread; ``server.shutdown()`` stops it. Beside
        it, for Kubernetes probes: ``/healthz`` (200 while this process serves) and
        ``/readyz`` (200 while ``ready()``, else 503)."""
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                if path == "/metrics":
                    self._send(200, metrics.render(), "text/plain; version=0.0.4")
                elif path == "/healthz":
                    self._send(200, "ok\n")
                elif path == "/readyz":
                    up = ready()
                    self._send(200 if up else 503, "ready\n" if up else "not ready\n")
                else:
                    self.send_error(404, "try /metrics, /healthz or /readyz")

            def _send(self, code: int, text: str, kind: str = "text/plain") -> None:
                body = text.encode()
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass  # scrapes every few seconds would drown the operator's log

        server = ThreadingHTTPServer((host, port), Handler)
        threading.Thread(target=server.serve_forever, name="skyhop-metrics", daemon=True).start()
        return server


def _labels(labels: LabelSet) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
