"""A mistyped command prints a short usage message that names what is wrong, exits 2,
and shows no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

CASES = [
    (["infer"], "Missing argument 'model'"),
    (["sla", "set", "digits"], "Missing option '--budget-ms'"),
    (["status", "--bogus"], "No such option: --bogus"),
    (["agent", "--concurrency", "many"], "Invalid value for '--concurrency'"),
    (["simulate"], "Missing option '--scenario'"),
]


@pytest.mark.parametrize(("args", "says"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_a_usage_error_is_named_with_exit_2(args: list[str], says: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "skyhop", *args], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert says in proc.stderr and "Usage: " in proc.stderr


def test_an_agent_with_no_models_says_where_to_name_them(tmp_path) -> None:
    subprocess.run([sys.executable, "-m", "skyhop", "init", "--home", str(tmp_path)],
                   check=True, capture_output=True, timeout=60)
    proc = subprocess.run([sys.executable, "-m", "skyhop", "agent", "--home", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "pass --models or set [agent] models" in proc.stderr
    assert "Traceback" not in proc.stderr
