"""The live pool: which workers to stop (pure), and the process pool's bookkeeping with
real child processes (``sleep``) standing in for agents: no MQTT."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud_broker.broker import Broker
from cloud_broker.config import AutoscaleConfig, BrokerConfig
from cloud_broker.pool import Worker, WorkerPool, choose_stop, local_pool, plan
from skyhop.errors import ConfigError
from skyhop.home import Home
from skyhop.mqtt.message import Message
from skyhop.protocol.messages import LoadReport, ModelLoad, NodeStatus
from skyhop.schema import updated

OLD, NEW, NEWER = 1_000.0, 2_000.0, 3_000.0


def test_stop_starting_workers_first_newest_first() -> None:
    workers = [Worker("a", OLD, ready_ms=1), Worker("b", NEW), Worker("c", NEWER)]
    assert choose_stop(workers, 1, {}) == ["c"]
    assert choose_stop(workers, 2, {}) == ["c", "b"]


def test_stop_idle_ready_workers_before_busy_ones_newest_first() -> None:
    workers = [Worker("old", OLD, 5), Worker("new", NEW, 5), Worker("busy", NEWER, 5)]
    assert choose_stop(workers, 1, {"busy": 3}) == ["new"]
    assert choose_stop(workers, 2, {"busy": 3, "new": 1}) == ["old", "new"]
    assert choose_stop(workers, 9, {}) == ["busy", "new", "old"]


def test_plan_starts_or_stops_the_difference() -> None:
    workers = [Worker("a", OLD, 1), Worker("b", NEW)]
    assert plan(5, workers, {}) == (3, [])
    assert plan(2, workers, {}) == (0, [])
    assert plan(1, workers, {}) == (0, ["b"])
    assert plan(0, [], {}) == (0, [])


class Spawner:
    """``spawn(name)`` for WorkerPool: a real child process per worker."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def __call__(self, name: str) -> subprocess.Popen[bytes]:
        proc = self.procs[name] = subprocess.Popen(self.argv)
        return proc


@pytest.fixture
def sleeper() -> Iterator[Spawner]:
    spawner = Spawner(["sleep", "60"])
    yield spawner
    for proc in spawner.procs.values():
        proc.kill()
        proc.wait()


def _until_reaped(pool: WorkerPool, now: float) -> None:
    deadline = time.monotonic() + 10
    while pool.stopping():
        assert time.monotonic() < deadline, f"not reaped: {pool.stopping()}"
        pool.poll(now)
        time.sleep(0.01)


def test_a_worker_is_starting_until_its_birth_then_ready(sleeper: Spawner) -> None:
    pool = WorkerPool(sleeper, ["w-1", "w-2"], slots=2)
    assert pool.start(3, now_ms=OLD) == ["w-1", "w-2"]  # no third name: fewer start
    assert pool.born("w-1", NEW) == NEW - OLD  # the cold start, as measured
    assert pool.born("w-1", NEWER) is None and pool.born("other", NEWER) is None
    view = pool.view()
    assert (view.ready, view.starting, view.slots, view.cold_starts_ms) == (1, 1, 2, (1_000.0,))
    assert pool.view().cold_starts_ms == ()  # each measurement is handed over once
    pool.close()
    assert all(p.poll() is not None for p in sleeper.procs.values())


def test_stop_terminates_and_reaps_and_frees_the_name(sleeper: Spawner) -> None:
    pool = WorkerPool(sleeper, ["w-1", "w-2"])
    pool.start(2, OLD)
    pool.stop(["w-1"], NEW)
    assert [w.name for w in pool.workers()] == ["w-2"] and pool.stopping() == ["w-1"]
    assert pool.start(1, NEW) == []  # w-1 is still leaving: its name is not free yet
    _until_reaped(pool, NEW)
    assert sleeper.procs["w-1"].returncode == -15  # SIGTERM, and waited for
    assert pool.poll(NEW) == []  # a stop asked for is not a crash
    assert pool.start(1, NEWER) == ["w-1"]
    pool.close()


def test_a_name_online_elsewhere_is_skipped_until_it_goes(
        sleeper: Spawner, caplog: pytest.LogCaptureFixture) -> None:
    pool = WorkerPool(sleeper, ["w-1", "w-2", "w-3"])
    elsewhere = {"w-1"}  # another broker's pool runs a w-1
    assert pool.start(0, OLD, online=elsewhere.__contains__) == []
    assert "online already" not in caplog.text  # no name wanted: none checked, none logged
    assert pool.start(1, OLD, online=elsewhere.__contains__) == ["w-2"]
    assert pool.start(1, NEW, online=elsewhere.__contains__) == ["w-3"]
    assert caplog.text.count("w-1 is online already and not this pool's") == 1
    elsewhere.clear()
    pool.stop(["w-2"], NEW)
    assert pool.start(1, NEWER, online=elsewhere.__contains__) == ["w-1"]
    pool.close()


def test_our_own_stopped_worker_still_online_is_skipped_without_a_warning(
        sleeper: Spawner, caplog: pytest.LogCaptureFixture) -> None:
    pool = WorkerPool(sleeper, ["w-1", "w-2"])
    pool.start(1, OLD)
    pool.stop(["w-1"], NEW)
    _until_reaped(pool, NEW)
    seen_online = {"w-1"}  # reaped, but its death message has not reached the fleet yet
    assert pool.start(1, NEW, online=seen_online.__contains__) == ["w-2"]
    assert "online already" not in caplog.text  # it is ours, not another pool's
    seen_online.clear()
    pool.stop(["w-2"], NEWER)
    assert pool.start(1, NEWER, online=seen_online.__contains__) == ["w-1"]
    pool.close()


def test_a_worker_that_ignores_sigterm_is_killed_after_the_grace() -> None:
    stubborn = Spawner(["sh", "-c", "trap '' TERM; sleep 60 & wait"])
    pool = WorkerPool(stubborn, ["w-1"], grace_s=1.0)
    pool.start(1, OLD)
    time.sleep(0.2)  # let the shell set its trap
    pool.stop(["w-1"], OLD)
    pool.poll(OLD + 500)
    assert pool.stopping() == ["w-1"]  # within the grace: still waiting
    _until_reaped(pool, OLD + 1_000)
    assert stubborn.procs["w-1"].returncode == -9


def test_a_worker_that_dies_unasked_is_reported_once_and_leaves_the_pool(
    sleeper: Spawner,
) -> None:
    pool = WorkerPool(sleeper, ["w-1", "w-2"])
    pool.start(2, OLD)
    pool.born("w-2", OLD)
    sleeper.procs["w-2"].kill()
    sleeper.procs["w-2"].wait()
    assert pool.poll(NEW) == ["w-2"]
    assert pool.poll(NEW) == []
    assert [w.name for w in pool.workers()] == ["w-1"]
    assert pool.start(1, NEWER) == ["w-2"]  # replaced under its name, at once
    pool.close()


def test_workers_that_never_come_up_are_retried_with_backoff() -> None:
    """A worker dying before its birth would die again: 10 s, 20 s, … between tries; a
    birth ends the streak."""
    broken = Spawner(["true"])
    pool = WorkerPool(broken, ["w-1"])
    t = 0.0
    for hold_s in (10, 20, 40):
        assert pool.start(1, t) == ["w-1"]
        broken.procs["w-1"].wait()
        assert pool.poll(t) == ["w-1"]
        assert pool.start(1, t + hold_s * 1000 - 1) == []  # held back
        t += hold_s * 1000
    assert pool.start(1, t) == ["w-1"]
    pool.born("w-1", t)  # it came up: the next failure waits only 10 s again
    broken.procs["w-1"].wait()
    pool.poll(t)
    assert pool.start(1, t) == ["w-1"]  # a crash after birth is replaced at once
    broken.procs["w-1"].wait()
    pool.poll(t)
    assert pool.start(1, t + 9_999) == [] and pool.start(1, t + 10_000) == ["w-1"]
    pool.close()


def test_local_pool_needs_models_and_checks_the_home(tmp_path) -> None:
    with pytest.raises(ConfigError, match="--pool-models digits"):
        updated(AutoscaleConfig(), "[broker.autoscale]", backend="local")
    with pytest.raises(ConfigError, match="min_size 3 is above max_size 2"):
        updated(AutoscaleConfig(), "[broker.autoscale]", min_size=3, max_size=2)
    cfg = updated(AutoscaleConfig(), "x", backend="local", models=["digits"])
    home = Home(tmp_path / "home")
    home.init()
    with pytest.raises(ConfigError, match="nope"):
        local_pool(home, "mqtt://127.0.0.1:1", updated(cfg, "x", models=["nope"]))
    for key in home.keys_dir.glob("worker-*.pem"):
        key.unlink()
    with pytest.raises(ConfigError, match="worker keys"):
        local_pool(home, "mqtt://127.0.0.1:1", cfg)


def test_local_pool_workers_run_on_the_configured_providers_and_gpus(tmp_path, monkeypatch) -> None:
    with pytest.raises(ConfigError, match="providers"):
        updated(AutoscaleConfig(), "x", providers=["gpu"])
    with pytest.raises(ConfigError, match="gpus"):
        updated(AutoscaleConfig(), "x", gpus=[-1])
    home = Home(tmp_path / "home")
    home.init()
    argv: list[list[str]] = []
    monkeypatch.setattr("cloud_broker.pool.spawn", lambda args, log, **kw: argv.append(args))

    def option(args: list[str], name: str) -> str | None:
        return args[args.index(name) + 1] if name in args else None

    base = updated(AutoscaleConfig(), "x", backend="local", models=["digits"], max_size=3)
    local_pool(home, "mqtt://127.0.0.1:1", base).start(1, 0.0)
    assert option(argv[-1], "--providers") is None and option(argv[-1], "--gpu") is None
    argv.clear()
    cfg = updated(base, "x", providers=["cuda", "cpu"], gpus=[0, 1])
    local_pool(home, "mqtt://127.0.0.1:1", cfg).start(3, 0.0)
    assert [option(a, "--providers") for a in argv] == ["cuda,cpu"] * 3
    assert [option(a, "--gpu") for a in argv] == ["0", "1", "0"]  # pool-1, -2, -3


# -- the broker's pool shell, driven by hand: fake processes, no MQTT ------------------


class FakeProcess:
    """A worker process that runs until signalled, or until a test sets ``returncode``."""

    pid = 0

    def __init__(self) -> None:
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self.returncode = -sig

    def kill(self) -> None:
        self.returncode = -9

    def wait(self, timeout: float | None = None) -> int | None:
        return self.returncode


def _broker(**autoscale: Any) -> tuple[Broker, dict[str, FakeProcess]]:
    procs: dict[str, FakeProcess] = {}

    def spawn(name: str) -> Any:
        procs[name] = FakeProcess()
        return procs[name]

    pool = WorkerPool(spawn, ["pool-1", "pool-2", "pool-3"], models=["m"])
    config = BrokerConfig(autoscale=AutoscaleConfig(**autoscale))
    return Broker("mqtt://127.0.0.1:1", config=config, pool=pool), procs


def _birth(broker: Broker, node: str) -> None:
    status = NodeStatus(node=node, online=True, session=1, role="cloud", models=("m",))
    broker._on_status(Message(broker.topics.status(node), status.encode()))


def _load(broker: Broker, node: str, mean_ms: float) -> None:
    report = LoadReport(node=node, session=1, seq=1, queue=0, in_flight=0, capacity=65,
                        rtt_ms=1.0, models={"m": ModelLoad(mean_ms, mean_ms * 1.4, 100)})
    broker._on_load(Message(broker.topics.load(node), report.encode()))


def test_the_broker_sizes_its_pool_and_shows_it(caplog: pytest.LogCaptureFixture) -> None:
    broker, procs = _broker(interval_ms=1000, max_size=3)
    t0 = time.monotonic() * 1000
    caplog.set_level(logging.INFO, "skyhop.broker")
    broker._pool_tick(t0)  # the first call: min_size, at once
    assert list(procs) == ["pool-1"] and broker.pool_gauges["starting"] == 1
    _birth(broker, "pool-1")
    _load(broker, "pool-1", mean_ms=50)
    assert broker.pool_gauges["last_cold_start_seconds"] > 0
    for _ in range(50):  # 50/s of 50 ms work wanting the cloud: far more than one worker
        broker.dispatcher.demand.request("m", budget_ms=200, cloud_wanted=True)
    broker._pool_tick(t0 + 1000)
    assert "scale target=3 ready=1 starting=2 reason=up,cloud_wanted=50.0/s" in caplog.text
    assert list(procs) == ["pool-1", "pool-2", "pool-3"]

    _birth(broker, "pool-2")
    procs["pool-2"].returncode = 1  # lost unasked: counted, replaced at the next call
    broker._pool_tick(t0 + 1500)
    assert not broker.fleet.is_live(broker.fleet.nodes["pool-2"], t0 + 1500)  # at once
    assert broker.pool_gauges["starting"] == 1 and "exited unasked with code 1" in caplog.text
    broker._pool_tick(t0 + 2000)
    pool = broker.status()["pool"]
    assert (pool["crashes"], pool["target"], pool["ready"], pool["starting"]) == (1, 3, 1, 2)
    metrics = broker.metrics.render().decode()
    for line in ("skyhop_broker_pool_target 3.0", "skyhop_broker_pool_worker_crashes_total 1.0",
                 "skyhop_broker_pool_workers_started_total 4.0",
                 'skyhop_broker_pool_scale_events_total{direction="up"} 2.0'):
        assert line in metrics, metrics


def test_the_broker_never_starts_a_worker_another_pool_runs(
        caplog: pytest.LogCaptureFixture) -> None:
    broker, procs = _broker(interval_ms=1000, max_size=3)
    _birth(broker, "pool-1")  # another broker's, with the same worker_prefix
    broker._pool_tick(time.monotonic() * 1000)
    assert list(procs) == ["pool-2"]
    assert "give each broker its own worker_prefix" in caplog.text


def test_the_ray_backend_without_ray_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cloud_broker.ray_pool import ray_pool

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    cfg = AutoscaleConfig(backend="ray", models=["digits"])
    with pytest.raises(ConfigError, match=r"pip install 'skyhop\[ray\]'"):
        ray_pool(Home(tmp_path), "mqtt://127.0.0.1:1", cfg)
