"""Process logs on stderr, as ``text`` (one line per event, for a terminal and grep) or
``json`` (one object per line, for Loki, Elasticsearch or jq).

A log call about a request or a node passes ``extra=fields(...)``: JSON lines carry
the request id, model, node and code as fields of their own; text lines say them in the
message already, so both read the same.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from pathlib import Path
from typing import IO

FORMATS = ("text", "json")
TEXT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def fields(*, request_id: str | None = None, model: str | None = None,
           node: str | None = None, code: object = None) -> dict[str, object]:
    """``extra=`` for a log call: under one attribute, so no name clashes with the
    LogRecord's own."""
    given = {"request_id": request_id, "model": model, "node": node,
             "code": None if code is None else str(code)}
    return {"skyhop": {k: v for k, v in given.items() if v is not None}}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc)
            .isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "skyhop", {}),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def setup(level: str, fmt: str = "text", *, path: Path | None = None,
          stream: IO[str] | None = None) -> None:
    """Log at ``level`` in ``fmt`` to ``path``, else ``stream`` (stderr)."""
    if fmt not in FORMATS:
        raise ValueError(f"--log-format {fmt!r}: use text or json")
    handler: logging.Handler = (logging.FileHandler(path) if path is not None
                                else logging.StreamHandler(stream or sys.stderr))
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
