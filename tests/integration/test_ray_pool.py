"""The cloud pool on a real Ray cluster (a local one, CPU only: ``num_gpus = 0``), and
pull-back while the pool warms, on the ``local`` and ``ray`` backends.

The broker starts the Ray cluster itself (``ray_address = "local"``) and stops it with
its pool; each worker is a Ray actor running ``skyhop agent --role cloud``. A GPU node
brought up by Ray's autoscaler is not tested here: no cloud is reachable (docs/pool.md).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from skyhop.client import Client
from skyhop.dev.localstack import LocalStack
from skyhop.dev.mosquitto import free_port
from tests.integration.test_pool import (
    POOL,
    X,
    _fleet,
    _grow_to_two,
    _outcome,
    _pool,
    _serving,
    _wait,
)

pytest.importorskip("ray")
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
# Workers of half a CPU: three fit on this 2-core machine's local cluster.
RAY = POOL.replace('backend = "local"', 'backend = "ray"') + """num_gpus = 0
num_cpus = 0.5
"""
COLD = """min_size = 0
scale_to_zero = true
idle_to_zero_ms = 600000
"""


def _settled(stack: LocalStack, size: int) -> dict | None:
    p = _pool(stack)
    return p if p and (p["target"], p["ready"], p["starting"], p["stopping"]) == (
        size, size, 0, 0) else None


@pytest.fixture
def ray_fleet(fleet_server, tmp_path: Path) -> Iterator[tuple[LocalStack, Client]]:
    with _fleet(fleet_server, tmp_path, RAY) as both:
        yield both


def test_a_ray_pool_grows_under_load_and_shrinks_back(ray_fleet) -> None:
    stack, client = ray_fleet
    _grow_to_two(stack, client, "ray")
    settled = _wait("the Ray pool back at min_size", lambda: _settled(stack, 1), 60, stack)
    assert [w["state"] for w in settled["workers"]] == ["ready"]
    log = (stack.log_dir / "broker.log").read_text()
    assert "ray pool on local" in log and "reason=down" in log


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_while_the_pool_warms_edges_take_the_burst(fleet_server, tmp_path: Path,
                                                   backend: str) -> None:
    """A cold pool and a burst: the edge serves it while the workers start, every
    request gets its one reply, and the pool warms up."""
    pool = (RAY if backend == "ray" else POOL) + COLD
    with _fleet(fleet_server, tmp_path, pool) as (stack, client):
        stack.agent("edge-1", ["busy"], "--providers", "cpu")
        stack.wait_live(["edge-1"])
        _wait("the pool sized", lambda: "target" in _pool(stack), 60, stack)
        first = client.infer("busy", X, budget_ms=5_000)
        assert first.header.where == "edge" and _pool(stack)["ready"] == 0
        # A burst at once: placed on arrival, while no worker is ready; budgets that
        # let edge-1 queue it all, since no worker comes up within milliseconds. Generous:
        # under load edge-1's p95, which placement plans with, is many single runs.
        budget = max(30_000.0, 400 * first.header.service_ms)
        burst = [client.submit("busy", X, budget_ms=budget) for _ in range(20)]
        outcomes = [_outcome(f) for f in burst]
        print(backend, {o: outcomes.count(o) for o in set(outcomes)})
        assert outcomes == ["OK"] * len(burst)  # each its one reply, none lost
        assert {f.result().header.where for f in burst} == {"edge"}
        assert client.counters["unmatched_replies"] == 0
        pool = _wait("a worker warmed by the burst", lambda: _pool(stack)["ready"] >= 1 and
                     _pool(stack), 60, stack)
        assert pool["last_cold_start_ms"] > 0


@pytest.fixture
def ray_cluster(tmp_path: Path) -> Iterator[str]:
    """A Ray cluster of its own, as a shared one would be: started by hand, outliving
    any broker (``ray start --head``; CPU only here)."""
    port = free_port()
    ray = [sys.executable, "-m", "ray.scripts.scripts"]
    subprocess.run([*ray, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                    "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false",
                    "--disable-usage-stats"],
                   check=True, capture_output=True, timeout=120)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([*ray, "stop", "--force"], capture_output=True, timeout=120)


def test_a_restarted_broker_adopts_the_actors_on_a_shared_cluster(
        fleet_server, transport: str, tmp_path: Path, ray_cluster: str, monkeypatch) -> None:
    if transport == "mqtt":
        pytest.skip("one transport is enough: a Ray cluster takes a minute to start here")
    # `ray start` made a token (~/.ray/auth_token); a driver sends it in token mode only.
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    pool = RAY.replace("[broker.autoscale]", f'[broker.autoscale]\nray_address = "{ray_cluster}"')
    with _fleet(fleet_server, tmp_path, pool) as (stack, client):
        _wait("a first Ray worker", lambda: _serving(stack), 120, stack)
        broker = stack.procs.pop("broker")
        broker.terminate()
        assert broker.wait(timeout=60) == 0
        stack.watcher().latest = None  # the old broker's retained status is no news
        stack.broker()
        settled = _wait("the new broker's pool", lambda: _settled(stack, 1), 60, stack)
        assert [w["node"] for w in settled["workers"]] == ["pool-1"]
        log = (stack.log_dir / "broker.log").read_text()
        assert "left running for the next broker to adopt" in log
        assert "ray pool: adopted pool-1" in log and "started ['pool-1']" not in log.split(
            "adopted pool-1")[1]  # nothing started anew
        assert client.infer("busy", X, budget_ms=30_000).header.where == "cloud"
