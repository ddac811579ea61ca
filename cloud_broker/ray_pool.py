"""The cloud pool on a Ray cluster: each worker is a Ray actor that runs the agent.

    pool = ray_pool(home, mqtt_url, config)       # [broker.autoscale] backend = "ray"

Ray places each actor where ``num_gpus`` and ``num_cpus`` are free, and Ray's own
autoscaler brings up the machines when none are (docs/pool.md): skyhop decides how many
workers, Ray on which machines. The actor writes the worker's home on its node (what
``skyhop bundle`` gives a cloud node: config, certificate and key, worker keys, models),
then runs ``python -m skyhop agent`` there as its child with ``--parent-pid`` its own
process, so the agent stops when the actor dies. The broker's account of the pool
(cold starts, crash backoff, names) is ``WorkerPool``'s; ``RayWorker`` is its handle.

Actors are owned by the broker: they end with it, as the local pool's processes do, so
a broker that restarts starts workers anew rather than adopting the old ones. Every Ray
node needs skyhop installed (in the cluster's image, or a ``runtime_env``).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from cloud_broker.config import AutoscaleConfig
from cloud_broker.pool import WorkerPool, check_home, worker_args, worker_names
from skyhop.errors import ConfigError
from skyhop.home import Home

log = logging.getLogger("skyhop.broker")
NAMESPACE = "skyhop"


class AgentActor:
    """Runs one agent on a Ray node (made a Ray actor by ``ray_pool``)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None

    def run(self, files: list[tuple[str, bytes, int]], args: list[str]) -> int:
        """Write ``files`` (path, bytes, mode) under a fresh folder, run the agent from
        its ``home/``, and return its exit code once it exits."""
        root = Path(tempfile.mkdtemp(prefix="skyhop-worker-"))
        try:
            for path, data, mode in files:
                target = root / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                target.chmod(mode)
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "skyhop", "agent", "--home", str(root / "home"),
                 *args, "--parent-pid", str(os.getpid())])
            return self._proc.wait()
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def stop(self) -> None:
        """A clean stop: SIGTERM; the agent publishes its death and exits."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()


class RayWorker:
    """A worker's actor, handled as ``WorkerPool`` handles a process."""

    def __init__(self, ray: Any, actor: Any, run: Any) -> None:
        self._ray, self._actor, self._run = ray, actor, run
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and self._ray.wait([self._run], timeout=0)[0]:
            try:
                self.returncode = int(self._ray.get(self._run))
            except self._ray.exceptions.RayError as exc:  # the actor or its node died
                log.warning("pool actor failed: %s", str(exc).splitlines()[0])
                self.returncode = -1
            self.kill()  # an actor that has run its agent holds its GPU until killed
        return self.returncode

    def terminate(self) -> None:
        self._actor.stop.remote()

    def kill(self) -> None:
        self._ray.kill(self._actor)

    def wait(self, timeout: float | None = None) -> int:
        if not self._ray.wait([self._run], timeout=timeout)[0]:
            raise subprocess.TimeoutExpired("ray actor", timeout or 0)
        code = self.poll()
        assert code is not None
        return code


def ray_pool(home: Home, mqtt_url: str, config: AutoscaleConfig) -> WorkerPool:
    """A pool whose workers are Ray actors on the cluster ``config.ray_address`` names."""
    from skyhop.deploy.bundle import Node, node_files

    ray = _import_ray()
    names = worker_names(config)
    check_home(home, mqtt_url, config.models, names)
    local = config.ray_address == "local"
    ray.init(address=None if local else config.ray_address, namespace=NAMESPACE,
             include_dashboard=False, log_to_driver=False, configure_logging=False)
    if local and ray.cluster_resources().get("GPU", 0) < config.num_gpus:
        ray.shutdown()
        raise ConfigError(f"this machine's Ray cluster has no {config.num_gpus:g} GPU for a "
                          f"worker: set num_gpus = 0 under [broker.autoscale] to run on CPUs")
    actor_class = ray.remote(AgentActor).options(
        num_gpus=config.num_gpus, num_cpus=config.num_cpus,
        max_concurrency=2)  # stop() runs while run() waits on the agent
    args = worker_args(config)

    def run_worker(name: str) -> RayWorker:
        files = node_files(home, Node(name, "cloud", tuple(config.models), mqtt_url),
                           dt.datetime.now(dt.timezone.utc))
        actor = actor_class.remote()
        return RayWorker(ray, actor, actor.run.remote(
            [(f.path, f.data, f.mode) for f in files], args))

    log.info("ray pool on %s: %s", config.ray_address, ray.cluster_resources())
    return WorkerPool(run_worker, names, models=config.models, slots=config.slots,
                      grace_s=config.stop_grace_s, kind="ray", on_close=ray.shutdown)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("the ray pool backend needs Ray: pip install 'skyhop[ray]'") from None
    return ray
