"""Running ``skyhop`` subcommands as child processes: the cloud pool's workers
(``cloud_broker/pool.py``) and the dev stack's fleet (``skyhop/dev/localstack.py``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from skyhop.errors import ConfigError
from skyhop.home import Home

PIP_TAIL_LINES = 12  # of pip's output, in the error: the reason is at the end


class ProcessLike(Protocol):
    """What stopping a worker takes, as ``subprocess.Popen`` offers it; a Ray actor's
    handle (``cloud_broker.ray_pool``) offers the same."""

    @property
    def returncode(self) -> int | None: ...
    def poll(self) -> int | None: ...
    def terminate(self) -> None: ...  # a clean stop: an agent publishes its own death
    def kill(self) -> None: ...
    def wait(self, timeout: float | None = None) -> int: ...  # TimeoutExpired past it


def spawn(args: list[str], log_path: Path, **popen: Any) -> subprocess.Popen[bytes]:
    """Start ``python -m skyhop ARGS`` with its output appended to ``log_path``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "skyhop", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            **popen,
        )


def pause(pid: int, timeout_s: float = 10.0) -> None:
    """SIGSTOP ``pid`` and return once every one of its threads has stopped (Linux).

    ``kill`` returns before the stop takes hold: the kernel wakes one thread to take the
    signal, and the others run on until it is scheduled and stops them all. On a busy
    machine that is long enough for an agent to read and run a request sent after the
    SIGSTOP, so a test or fault that needs the process held waits for /proc to say so.
    """
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout_s
    while not all(state in "Tt" for state in _thread_states(pid)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {pid} did not stop within {timeout_s:.0f} s")
        time.sleep(0.005)


def _thread_states(pid: int) -> list[str]:
    """The state letter of each thread of ``pid`` (R, S, D, T, …), from /proc."""
    states = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except FileNotFoundError:  # the thread exited meanwhile
            continue
        states.append(stat.rpartition(")")[2].split()[0])  # the name may hold spaces
    return states


def terminate(procs: Iterable[ProcessLike], grace_s: float) -> None:
    """SIGTERM every process (a clean exit: an agent publishes its own death), wait up
    to ``grace_s`` for each, then SIGKILL what is left; all are reaped on return."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()  # SIGTERM
    for proc in procs:
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def agent_args(
    home: Home, mqtt_url: str, node_id: str, models: Sequence[str], role: str, *extra: str
) -> list[str]:
    """The ``skyhop`` arguments that run one agent from ``home``."""
    return [
        "agent",
        "--mqtt",
        mqtt_url,
        "--home",
        str(home.path),
        "--node-id",
        node_id,
        "--models",
        ",".join(models),
        "--role",
        role,
        *extra,
    ]


def run_pip(cmd: Sequence[str], doing: str, hint: str, timeout_s: float) -> None:
    """Run a pip command line (model downloads, bundle wheelhouses); a ConfigError with
    the end of pip's output and ``hint`` if it cannot run or fails. Never prompts."""
    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout_s,
                              check=False, env=os.environ | {"PIP_NO_INPUT": "1"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"could not run {' '.join(cmd)}: {exc}\n{hint}") from None
    if done.returncode != 0:
        lines = (done.stdout + done.stderr).strip().splitlines()[-PIP_TAIL_LINES:]
        tail = "\n".join(f"  | {line}" for line in lines)
        raise ConfigError(f"{doing} failed (exit {done.returncode}):\n{tail}\n{hint}")
