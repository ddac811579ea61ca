"""The audit trail: who changed what in the fleet, as hash-chained JSON lines.

``HOME/audit.jsonl`` holds one JSON object per line: ``time`` (UTC, ISO 8601),
``actor`` (a certificate name, or user@host for commands run without one),
``action`` (e.g. ``certs.issue``), ``changed`` (what changed) and ``prev``, the
SHA-256 of the previous line's bytes (64 zeros on the first). Changing, removing or
reordering a line breaks the chain at the line after it, which ``verify`` names.

A chain cannot show that its newest lines were cut off: ``skyhop audit verify`` prints
the head hash, for operators who keep it elsewhere (a ticket, another host) to compare.

Appends from several processes on one home (the CLI and a broker) are serialised with
an exclusive ``flock`` on the file, so each line chains to the one before it.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import getpass
import hashlib
import json
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENESIS = "0" * 64
TAIL_BYTES = 65_536  # a line is far shorter: the last one is within this of the end


def local_actor() -> str:
    """Who runs a command that holds no certificate: user@host."""
    return f"{getpass.getuser()}@{socket.gethostname()}"


def digest(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def entry_line(prev: str, actor: str, action: str, changed: dict[str, Any],
               now: dt.datetime) -> bytes:
    doc = {"time": now.isoformat(timespec="milliseconds"), "actor": actor,
           "action": action, "changed": changed, "prev": prev}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str).encode() + b"\n"


def record(path: Path, actor: str, action: str, changed: dict[str, Any],
           now: dt.datetime | None = None) -> None:
    """Append one entry, chained to the last line (OSError if the file is not writable)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - TAIL_BYTES))
        lines = f.read().splitlines()
        prev = digest(lines[-1]) if lines else GENESIS
        f.write(entry_line(prev, actor, action, changed, now))


@dataclass(frozen=True)
class Entry:
    number: int  # 1-based line number
    time: dt.datetime
    actor: str
    action: str
    changed: dict[str, Any]


class Broken(Exception):
    """The chain breaks at line ``number``."""

    def __init__(self, number: int, why: str) -> None:
        super().__init__(f"line {number}: {why}")
        self.number = number


def entries(lines: Iterable[bytes]) -> Iterator[Entry]:
    """Check the chain while reading it; raise Broken at the first bad line."""
    prev = GENESIS
    for number, line in enumerate(lines, 1):
        try:
            doc = json.loads(line)
            entry = Entry(number, dt.datetime.fromisoformat(doc["time"]), str(doc["actor"]),
                          str(doc["action"]), dict(doc["changed"]))
            chained = doc["prev"]
        except (ValueError, KeyError, TypeError):
            raise Broken(number, "not an audit entry") from None
        if chained != prev:
            raise Broken(number, "does not chain to the line before it (that line, or "
                         "this one, was changed, removed or moved)")
        prev = digest(line)
        yield entry


def head(lines: list[bytes]) -> str:
    return digest(lines[-1]) if lines else GENESIS


def read_lines(path: Path) -> list[bytes]:
    try:
        return path.read_bytes().splitlines()
    except FileNotFoundError:
        return []
