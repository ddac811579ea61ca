"""A process's HTTP endpoints on a daemon thread: Prometheus ``/metrics``, the
Kubernetes probes, and whatever else the process adds (the broker's status page).

    server = serve(9464, "127.0.0.1", probes(metrics, ready=lambda: bus.connected))
    server.shutdown()

A route is a function of the query string that returns ``(status, content type,
body)``; it runs on the server's own thread, never on the process's MQTT thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from skyhop.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger("skyhop.http")
Response = tuple[int, str, bytes]
Route = Callable[[Mapping[str, str]], Response]
TEXT = "text/plain; charset=utf-8"


def text(status: int, body: str) -> Response:
    return status, TEXT, body.encode()


def probes(metrics: Metrics, ready: Callable[[], bool]) -> dict[str, Route]:
    """``/metrics``; ``/healthz``, 200 while the process serves; ``/readyz``, 200 only
    while ``ready()`` (else 503): what a Kubernetes readiness probe routes on."""

    def readyz(_: Mapping[str, str]) -> Response:
        return text(200, "ready\n") if ready() else text(503, "not ready\n")

    return {
        "/metrics": lambda _: (200, CONTENT_TYPE, metrics.render()),
        "/healthz": lambda _: text(200, "ok\n"),
        "/readyz": readyz,
    }


def serve(port: int, host: str, routes: Mapping[str, Route]) -> ThreadingHTTPServer:
    """Serve ``routes`` on ``host:port`` from a daemon thread; a route that raises
    answers 500 and is logged, and the server goes on."""
    known = ", ".join(sorted(routes))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlsplit(self.path)
            route = routes.get(url.path)
            if route is None:
                self._send(*text(404, f"not found; try {known}\n"))
                return
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            try:
                response = route(query)
            except Exception:
                log.exception("GET %s failed", url.path)
                response = text(500, "internal error; see the process's log\n")
            self._send(*response)

        def _send(self, status: int, kind: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass  # scrapes and page polls every few seconds would drown the operator's log

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="skyhop-http", daemon=True).start()
    return server
