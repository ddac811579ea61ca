"""The broker's HTTP port (``skyhop broker --http-port``): ``/metrics``, ``/healthz``,
``/readyz``, the JSON ``/status``, and the status page at ``/``.

The page is three static files shipped in the package (``cloud_broker/static``): no
build step and no CDN, since a broker's network may reach nothing but its fleet. It
polls ``/status`` once a second (docs/operations.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any

from skyhop.httpd import Response, Route, probes
from skyhop.metrics import Metrics

ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}


def routes(metrics: Metrics, ready: Callable[[], bool],
           status: Callable[[], Mapping[str, Any]]) -> dict[str, Route]:
    table = probes(metrics, ready)
    table["/status"] = lambda _: (200, "application/json",
                                  json.dumps(status(), separators=(",", ":")).encode())
    files = resources.files("cloud_broker") / "static"
    for path, (name, kind) in ASSETS.items():
        body = (files / name).read_bytes()  # read once: the files do not change

        def asset(_: Mapping[str, str], body: bytes = body, kind: str = kind) -> Response:
            return 200, kind, body

        table[path] = asset
    return table
