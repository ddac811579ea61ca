"""The audit trail (skyhop.audit) on a real file: appends chain, and any change,
removal or move of a line is found at the line where the chain breaks."""

from __future__ import annotations

import datetime as dt
import multiprocessing
from pathlib import Path

import pytest

from skyhop import audit

T0 = dt.datetime(2026, 12, 2, 12, tzinfo=dt.timezone.utc)


def trail(path: Path, n: int = 4) -> list[bytes]:
    for i in range(n):
        audit.record(path, "alice", "sla.set", {"model": f"m{i}", "budget_ms": 40 + i},
                     T0 + dt.timedelta(seconds=i))
    return path.read_bytes().splitlines()


def broken_at(lines: list[bytes]) -> int:
    with pytest.raises(audit.Broken) as info:
        list(audit.entries(lines))
    return info.value.number


def test_entries_read_back_in_order(tmp_path: Path) -> None:
    lines = trail(tmp_path / "audit.jsonl")
    got = list(audit.entries(lines))
    assert [e.changed["model"] for e in got] == ["m0", "m1", "m2", "m3"]
    assert got[0].actor == "alice" and got[0].action == "sla.set" and got[2].time > got[1].time
    assert audit.head(lines) == audit.digest(lines[-1])


def test_a_changed_removed_or_moved_line_names_where_the_chain_breaks(tmp_path: Path) -> None:
    lines = trail(tmp_path / "audit.jsonl")
    assert broken_at([*lines[:1], lines[1].replace(b'"budget_ms":41', b'"budget_ms":9'),
                      *lines[2:]]) == 3
    assert broken_at([lines[0], *lines[2:]]) == 2  # removed
    assert broken_at([lines[0], lines[2], lines[1], lines[3]]) == 2  # moved
    assert broken_at([lines[1], *lines[2:]]) == 1  # the first one removed
    assert broken_at([*lines[:2], b"not json", *lines[2:]]) == 3


def _append(path: str) -> None:
    for i in range(25):
        audit.record(Path(path), "p", "x", {"i": i})


def test_processes_appending_at_once_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    procs = [multiprocessing.Process(target=_append, args=(str(path),)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert len(list(audit.entries(audit.read_lines(path)))) == 100
