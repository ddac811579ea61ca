"""The cloud pool on a Ray cluster: each worker is a Ray actor that runs the agent.

    pool = ray_pool(home, mqtt_url, config)       # [broker.autoscale] backend = "ray"

Ray places each actor where ``num_gpus`` and ``num_cpus`` are free, and Ray's own
autoscaler brings up the machines when none are (docs/pool.md): skyhop decides how many
workers, Ray on which machines. The actor writes the worker's home on its node (what
``skyhop bundle`` gives a cloud node: config, certificate and key, worker keys, models),
then runs ``python -m skyhop agent`` there as its child with ``--parent-pid`` its own
process, so the agent stops when the actor dies. The broker's account of the pool
(cold starts, crash backoff, names) is ``WorkerPool``'s; ``RayWorker`` is its handle.

With ``ray_address = "local"`` the cluster, and so the actors, end with the broker. On a
cluster of its own (``auto``, ``ray://…``) each actor is detached and named for its node
(``pool-1`` …, namespace ``skyhop``): a broker that stops leaves them serving, and one
that starts adopts them instead of starting new ones. Every Ray node needs skyhop
installed (in the cluster's image, or a ``runtime_env``).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
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

    def join(self) -> int:
        """Wait for the agent ``run`` started to exit; its exit code (for a broker that
        adopts this actor: the call that started it belonged to the previous broker)."""
        while self._proc is None:
            time.sleep(0.1)
        return self._proc.wait()

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
    try:
        ray.init(address=None if local else config.ray_address, namespace=NAMESPACE,
                 include_dashboard=False, log_to_driver=False, configure_logging=False)
    except ConnectionError as exc:
        raise ConfigError(f"ray pool: {exc}: is the cluster up (`ray status --address "
                          f"{config.ray_address}`)? ray_address under [broker.autoscale] "
                          f"names it") from None
    if local and ray.cluster_resources().get("GPU", 0) < config.num_gpus:
        ray.shutdown()
        raise ConfigError(f"this machine's Ray cluster has no {config.num_gpus:g} GPU for a "
                          f"worker: set num_gpus = 0 under [broker.autoscale] to run on CPUs")
    actor_class = ray.remote(AgentActor)
    args = worker_args(config)

    def run_worker(name: str) -> RayWorker:
        files = node_files(home, Node(name, "cloud", tuple(config.models), mqtt_url),
                           dt.datetime.now(dt.timezone.utc))
        # On a cluster of its own the actors end with it; on a shared one they are
        # detached and named for their node, so that a restarted broker adopts them.
        named = {} if local else {"name": name, "lifetime": "detached"}
        actor = actor_class.options(
            num_gpus=config.num_gpus, num_cpus=config.num_cpus, **named,
            max_concurrency=3).remote()  # stop() and join() run while run() waits
        return RayWorker(ray, actor, actor.run.remote(
            [(f.path, f.data, f.mode) for f in files], args))

    log.info("ray pool on %s: %s", config.ray_address, ray.cluster_resources())
    pool = WorkerPool(run_worker, names, models=config.models, slots=config.slots,
                      grace_s=config.stop_grace_s, kind="ray", on_close=ray.shutdown)
    if not local:
        pool.keep_on_close = True
        for name in names:
            try:
                actor = ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:
                continue  # none of that name: it will be started when needed
            pool.adopt(name, RayWorker(ray, actor, actor.join.remote()),
                       time.monotonic() * 1000)
            log.info("ray pool: adopted %s, left running by a previous broker", name)
    return pool


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("the ray pool backend needs Ray: pip install 'skyhop[ray]'") from None
    return ray
