"""The live cloud pool: a broker started with a local pool and no edge nodes grows it
under a load one worker cannot serve within budget, replaces a worker lost under load,
answers every request exactly once, and shrinks back to ``min_size`` with every worker
process it stopped reaped; workers of a broker killed with SIGKILL stop by themselves."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud_broker.autoscaler import ModelDemand, ScaleConfig, workers_needed
from skyhop import audit
from skyhop.client import Client, Result
from skyhop.dev.localstack import LocalStack
from skyhop.errors import RemoteError
from skyhop.home import Home
from skyhop.protocol.topics import Topics
from tests.integration.fleet import add_busy_model, make_home

pytestmark = pytest.mark.integration
WORKERS = {f"pool-{i}": "cloud" for i in (1, 2, 3)}  # certificates, over mqtts
X = {"x": np.ones((1, 64), np.float32)}
LOCAL_EXPIRY = "no reply from the fleet within the budget"  # the client's own, not the fleet's
# Workers on CPU: the load is sized from a CPU's service time, and on a GPU `busy` runs
# in half a millisecond, where no rate this client sends needs a second worker.
POOL = """
[broker.autoscale]
backend = "local"
models = ["busy"]
providers = ["cpu"]
max_size = 3  # min_size: 1, the default
interval_ms = 500
downscale_delay_ms = 2000
cold_start_prior_ms = 3000
stop_grace_s = 5
"""
TO_ZERO = """min_size = 0
scale_to_zero = true
idle_to_zero_ms = 1000
"""


@contextmanager
def _fleet(fleet_server, root: Path, pool: str) -> Iterator[tuple[LocalStack, Client]]:
    """A broker with a local pool configured by ``pool``, no agents, and a client."""
    home = make_home(root)
    add_busy_model(home)
    config = home.path / "config.toml"
    text = config.read_text().replace("status_interval_s = 1.0", "status_interval_s = 0.2")
    config.write_text(text + pool)
    with (
        fleet_server(home, WORKERS) as (url, server),
        LocalStack(home, url, root / "logs", server) as stack,
    ):
        stack.broker()
        tls = home.tls(url, "client-1")
        topics = Topics(home.config().prefix)
        # A long local slack: a request the fleet never answered shows as LOCAL_EXPIRY.
        with Client(url, home.fleet_public(), topics=topics, client_id="client-1", tls=tls,
                    slack_ms=30_000) as client:
            yield stack, client


@pytest.fixture
def fleet(fleet_server, tmp_path: Path) -> Iterator[tuple[LocalStack, Client]]:
    with _fleet(fleet_server, tmp_path, POOL) as both:
        yield both


@pytest.fixture
def empty_fleet(fleet_server, tmp_path: Path) -> Iterator[tuple[LocalStack, Client]]:
    with _fleet(fleet_server, tmp_path, POOL + TO_ZERO) as both:
        yield both


def _status(stack: LocalStack) -> dict[str, Any]:
    return stack.watcher().latest or {}


def _wait(what: str, check: Callable[[], Any], timeout: float, stack: LocalStack) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"{what} not within {timeout} s: {_status(stack)}"
        time.sleep(0.1)
    return found


def _pool(stack: LocalStack) -> dict[str, Any]:
    return _status(stack).get("pool", {})


def _serving(stack: LocalStack) -> list[float]:
    """The reported ``busy`` service times (a warm-up at first) of the live pool workers
    that have sent a load report: until its first, the broker gives a node one request."""
    return [float(n["service_ms"]["busy"]) for n in _status(stack).get("nodes", [])
            if n["live"] and n["role"] == "cloud" and n["service_ms"].get("busy")]


def _load_for_two_workers(service_ms: float) -> tuple[float, float]:
    """(budget ms, rate per second) at which the autoscaler's own queueing model wants
    two workers of ``service_ms`` even when its p95 is no worse than its mean, doubled."""
    budget = 3 * service_ms + 50
    demand = ModelDemand("busy", 0, service_ms=service_ms, p95_ms=service_ms, budget_ms=budget)
    rate = next(r / 10 for r in range(1, 1000)
                if workers_needed((demand,), {"busy": r / 10}, 1, ScaleConfig()) >= 2)
    return budget, min(2 * rate, 40.0)


def _grow_to_two(stack: LocalStack, client: Client, backend: str) -> dict[str, Any]:
    """Wait for the first worker, then drive a load it cannot hold until a second is
    serving; every request must get its one reply. Returns the pool's first status."""
    service_ms = _wait(f"a first {backend} worker", lambda: _serving(stack), 120, stack)[0]
    first = _pool(stack)
    assert first["backend"] == backend and first["last_cold_start_ms"] > 0
    budget, rate = _load_for_two_workers(service_ms)
    sent = _drive(client, budget, rate, 40, until=lambda: len(_serving(stack)) >= 2)
    assert _pool(stack)["ready"] >= 2, _status(stack)
    outcomes = [_outcome(f) for f in sent]
    print(f"cold start {first['last_cold_start_ms']:.0f} ms;",
          {o: outcomes.count(o) for o in set(outcomes)})
    time.sleep(0.5)
    assert client.counters["unmatched_replies"] == 0  # never two replies for one request
    assert LOCAL_EXPIRY not in outcomes  # and never none
    return first


def _children(pid: int) -> set[int]:
    """Child processes of ``pid``, zombies included: a worker not yet reaped counts."""
    kids: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids |= {int(k) for k in (task / "children").read_text().split()}
    return kids


def _busiest(stack: LocalStack) -> str | None:
    """The live pool worker with the most of the broker's requests outstanding, if any."""
    held = {n["node"]: n["outstanding"] for n in _status(stack).get("nodes", [])
            if n["live"] and n["role"] == "cloud" and n["outstanding"] > 0}
    return max(held, key=held.__getitem__) if held else None


def _pid_of(parent: int, node: str) -> int:
    """The child of ``parent`` that runs agent ``node``."""
    for pid in _children(parent):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if node.encode() in argv and b"--node-id" in argv:
            return pid
    raise AssertionError(f"no process for {node} under {parent}")


def _settled(stack: LocalStack, broker_pid: int, size: int) -> dict[str, Any] | None:
    """The pool's status once it is ``size`` ready workers, none starting or stopping,
    and the broker has no other child process: every worker it stopped was reaped."""
    p = _pool(stack)
    if not p or (p["target"], p["ready"], p["starting"], p["stopping"]) != (size, size, 0, 0):
        return None
    return p if len(_children(broker_pid)) == size else None


def _drive(client: Client, budget: float, rate: float, seconds: float,
           until: Callable[[], bool] = lambda: False) -> list[Future[Result]]:
    """Open-loop requests at ``rate`` for ``seconds``, or until ``until()``."""
    sent: list[Future[Result]] = []
    start = time.monotonic()
    while time.monotonic() - start < seconds and not until():
        sent.append(client.submit("busy", X, budget_ms=budget))
        time.sleep(max(0.0, start + len(sent) / rate - time.monotonic()))
    return sent


def _outcome(future: Future[Result]) -> str:
    try:
        future.result(timeout=60)
        return "OK"
    except RemoteError as exc:
        return LOCAL_EXPIRY if exc.message == LOCAL_EXPIRY else str(exc.code)


def test_pool_grows_under_load_and_shrinks_back(fleet) -> None:
    stack, client = fleet
    broker_pid = stack.procs["broker"].pid
    service_ms = _wait("a first pool worker", lambda: _serving(stack), 60, stack)[0]
    budget, rate = _load_for_two_workers(service_ms)
    print(f"busy {service_ms:.1f} ms: {rate:.1f} requests/s with {budget:.0f} ms budgets")

    sent = _drive(client, budget, rate, 30, until=lambda: len(_serving(stack)) >= 2)
    assert _pool(stack)["ready"] >= 2, _status(stack)

    # A worker lost while it holds work, by SIGTERM as a scale-down stops one: the broker
    # re-places what it held, and the pool counts the loss and starts another worker.
    burst = [client.submit("busy", X, budget_ms=15_000) for _ in range(20)]
    victim = _wait("a pool worker holding work", lambda: _busiest(stack), 10, stack)
    lost = _pid_of(broker_pid, victim)
    os.kill(lost, signal.SIGTERM)
    sent += burst + _drive(client, budget, rate, 2)

    outcomes = [_outcome(f) for f in sent]
    print("outcomes", {o: outcomes.count(o) for o in set(outcomes)}, "lost", victim)
    time.sleep(0.5)  # a second reply, if any, would be here by now
    assert client.counters["unmatched_replies"] == 0  # never two replies for one request
    assert LOCAL_EXPIRY not in outcomes  # and never none
    assert all(_outcome(f) == "OK" for f in burst), outcomes  # re-placed, within budget

    pool = _wait("the pool back at min_size", lambda: _settled(stack, broker_pid, 1), 40, stack)
    assert pool["crashes"] >= 1 and pool["last_cold_start_ms"] > 0
    assert lost not in _children(broker_pid)
    log = (stack.log_dir / "broker.log").read_text()
    assert "scale target=" in log and "reason=up" in log and "reason=down" in log
    assert re.search(r"reason=down,\S*,hold=\d+s", log)  # how long idle workers are kept
    scaled = [e for e in audit.entries(audit.read_lines(stack.home.audit_path))
              if e.action == "pool.scale"]  # the trail has each decision, and is intact
    assert scaled and {"from", "to", "why"} <= set(scaled[0].changed)
    assert any(e.changed["to"] > e.changed["from"] for e in scaled)
    assert "ready after a" in log  # the cold start, measured from spawn to birth
    assert f"node {victim} stopped" in log  # a SIGTERM: a clean stop, its work re-placed


def test_an_empty_pool_wakes_on_demand_and_returns_to_zero(empty_fleet) -> None:
    stack, client = empty_fleet
    broker_pid = stack.procs["broker"].pid
    _wait("the pool sized", lambda: "target" in _pool(stack), 30, stack)
    assert _pool(stack)["target"] == 0 and not _children(broker_pid)
    outcomes = []
    deadline = time.monotonic() + 60
    while not outcomes or outcomes[-1] != "OK":  # the first ones find no worker at all
        assert time.monotonic() < deadline, f"no worker woke up: {outcomes}"
        outcomes.append(_outcome(client.submit("busy", X, budget_ms=5_000)))
        time.sleep(0.2)
    assert outcomes[0] == "UNAVAILABLE" and _pool(stack)["last_cold_start_ms"] > 0
    _wait("the pool back at zero", lambda: _settled(stack, broker_pid, 0), 40, stack)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--pool", "local"], "--pool-models digits"),
        (["--pool", "k8s"], "backend: Input should be 'none', 'local', 'kubernetes' or 'ray'"),
        (["--pool", "kubernetes", "--pool-models", "digits"], "no Kubernetes API to reach"),
        (["--pool", "local", "--pool-models", "nope"], "nope"),
        (["--pool", "ray"], "the ray pool needs the models"),
    ],
)
def test_a_bad_pool_is_one_clear_line(tmp_path: Path, args: list[str], says: str) -> None:
    home = Home(tmp_path / "home")
    home.init()
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    env["KUBECONFIG"] = str(tmp_path / "no-kubeconfig")  # not this machine's, if it has one
    proc = subprocess.run([sys.executable, "-m", "skyhop", "broker", "--home", str(home.path),
                           *args], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 1 and says in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def _exited(pid: int) -> bool:
    """Whether ``pid`` has exited: gone, or a zombie its new parent has yet to reap."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_workers_stop_when_their_broker_is_killed(fleet) -> None:
    stack, _ = fleet
    broker = stack.procs["broker"]
    _wait("a first pool worker", lambda: _serving(stack), 60, stack)
    worker = _pid_of(broker.pid, "pool-1")
    broker.kill()  # SIGKILL: nobody is left to stop the worker
    broker.wait()
    _wait("the orphaned worker gone", lambda: _exited(worker), 15, stack)
    log = (stack.home.path / "logs" / "pool" / "pool-1.log").read_text()
    assert f"parent process {broker.pid} exited; stopping" in log
