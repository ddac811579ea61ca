"""The live cloud GPU pool: workers started and stopped on the autoscaler's word.

    pool = local_pool(home, mqtt_url, config)  # config: [broker.autoscale]; or ray_pool
    pool.start(2, now_ms)                 # two workers, *starting*
    pool.born("pool-1", now_ms)           # the broker saw pool-1's birth: *ready*
    lost = pool.poll(now_ms)              # workers that exited unasked; reaps stopped ones
    view = pool.view()                    # a PoolView for scale(), with cold starts measured
    start, stop = plan(target, pool.workers(), busy)   # pure: how to reach the target
    pool.stop(stop, now_ms)

A worker is *starting* from the moment it is asked for until the broker sees its birth
(its retained online status on the fleet), then *ready*. The cold start the autoscaler
learns from is that interval on the broker's clock: measured, not assumed.

Stopping is a clean exit: the worker publishes its own death and the broker re-places
whatever it still held (``Broker._rescue``), so no request is lost; one that has not
exited after the grace is killed, and its MQTT will does the same. A worker that exits
unasked is a crash: it leaves the pool, and the next scale call replaces it. A worker
whose broker died (even by SIGKILL, which leaves nobody to stop it) stops itself within
a second or so (``skyhop agent --parent-pid``).

``PoolBackend`` is what the broker needs of any pool. ``WorkerPool`` keeps that
account over any worker ``Handle`` (it polls, terminates, kills and waits like a
``Popen``): ``local_pool`` makes ``skyhop agent --role cloud`` processes on this machine,
``cloud_broker.ray_pool`` Ray actors that run the same agent (docs/pool.md).
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Protocol

from cloud_broker.autoscaler import PoolView
from cloud_broker.config import AutoscaleConfig
from skyhop.errors import ConfigError
from skyhop.home import Home
from skyhop.mqtt.url import MqttUrl
from skyhop.process import ProcessLike as Handle
from skyhop.process import agent_args, spawn, terminate

log = logging.getLogger("skyhop.broker")
# A worker that dies before its birth (a broken model, a missing certificate) would die
# again: starts are held back 10 s after the first such death, doubling to 5 minutes,
# as Kubernetes does with a CrashLoopBackOff; a birth ends the streak.
BACKOFF_S, BACKOFF_MAX_S = 10.0, 300.0


@dataclass(frozen=True)
class Worker:
    name: str  # its node id
    asked_ms: float  # when it was started, on the broker's clock
    ready_ms: float | None = None  # when the broker saw its birth
    phase: str = "starting"  # before its birth: asked, scheduled or starting (Kubernetes)

    @property
    def ready(self) -> bool:
        return self.ready_ms is not None


class PoolBackend(Protocol):
    kind: str  # "local", …: shown in the broker's status
    models: tuple[str, ...]  # what every worker serves
    slots: int  # requests one worker runs at once
    # True: ``stop`` only marks a ready worker draining, and the broker orders the drain
    # over MQTT; the backend removes it once ``left`` reports its death.
    drain_over_mqtt: bool

    @property
    def active(self) -> bool:
        """False on a broker replica that watches a pool another one sizes (Kubernetes)."""
        ...

    def start(self, n: int, now_ms: float,
              online: Callable[[str], bool] = lambda name: False) -> list[str]:
        """Start up to ``n`` workers; return the names of those started. A name that is
        ``online`` already belongs to another process (another broker's pool): it is
        never started, since two agents of one name would take each other's session."""
        ...

    def stop(self, names: Sequence[str], now_ms: float) -> None:
        """Tell these workers to leave; from now on they are not in ``workers()``."""
        ...

    def born(self, name: str, now_ms: float) -> float | None:
        """The broker saw ``name`` online: a starting worker is ready. Returns its cold
        start in ms, or None when ``name`` was not starting here."""
        ...

    def left(self, name: str, now_ms: float) -> None:
        """The broker saw ``name``'s death (after a drain, or a stop)."""
        ...

    def poll(self, now_ms: float) -> list[str]:
        """Finish stops that are due; return the workers that went away unasked."""
        ...

    def workers(self) -> list[Worker]:
        """Starting and ready workers: the pool's size, as the autoscaler counts it."""
        ...

    def stopping(self) -> list[str]:
        """Workers told to stop that have not gone yet."""
        ...

    def view(self) -> PoolView:
        """Ready and starting workers, and the cold starts measured since the last call."""
        ...

    def close(self) -> None:
        """Stop every worker and wait for them (the broker is shutting down)."""
        ...


def plan(target: int, workers: Sequence[Worker],
         busy: Mapping[str, int]) -> tuple[int, list[str]]:
    """How to reach ``target`` workers: (how many to start, which to stop)."""
    if target >= len(workers):
        return target - len(workers), []
    return 0, choose_stop(workers, len(workers) - target, busy)


def choose_stop(workers: Sequence[Worker], n: int, busy: Mapping[str, int]) -> list[str]:
    """The ``n`` workers to stop: starting ones first (they serve nothing yet), then the
    ready ones with the fewest requests outstanding (``busy``: fewer to re-place); the
    newest first among equals, since the oldest have the best-measured service times."""
    order = sorted(workers, key=lambda w: (w.ready, busy.get(w.name, 0), -w.asked_ms, w.name))
    return [w.name for w in order[:n]]


class WorkerPool:
    """The pool's account: ``spawn(name)`` starts one worker and returns its handle;
    ``names`` are the node ids it may use, in order (a name is reused once its last
    worker is reaped). ``kind`` names the backend in the broker's status."""

    def __init__(self, spawn: Callable[[str], Handle], names: Sequence[str],
                 *, models: Sequence[str] = (), slots: int = 1, grace_s: float = 10.0,
                 log_dir: Path | None = None, kind: str = "local",
                 on_close: Callable[[], None] = lambda: None) -> None:
        self.kind = kind
        self.active = True
        self.drain_over_mqtt = False  # a stop is the worker's SIGTERM
        self._on_close = on_close
        self.models = tuple(models)
        self.slots = slots
        self.grace_s = grace_s
        self.log_dir = log_dir
        self._spawn = spawn
        self._names = list(names)
        self._workers: dict[str, tuple[Worker, Handle]] = {}
        self._stopping: dict[str, tuple[Handle, float]] = {}  # -> kill at
        self._cold_starts: list[float] = []
        self._failed_starts = 0  # workers in a row that died before their birth
        self._hold_until_ms = 0.0
        self._foreign_names: set[str] = set()  # names seen online that are not ours
        self._reaped: set[str] = set()  # ours, exited; the fleet may not have seen it go yet
        self._adopted: set[str] = set()  # running before this broker: no cold start to learn
        self.keep_on_close = False  # close() leaves the workers for the next broker

    def start(self, n: int, now_ms: float,
              online: Callable[[str], bool] = lambda name: False) -> list[str]:
        if now_ms < self._hold_until_ms:
            return []  # backing off a crash loop (see BACKOFF_S)
        taken = self._workers.keys() | self._stopping.keys()
        free = (name for name in self._names if name not in taken)
        # Lazily: a name is only checked (and a foreign one only logged) when one is needed.
        names = list(islice((name for name in free if not self._in_use(name, online)),
                            max(0, n)))
        for name in names:
            self._workers[name] = (Worker(name, now_ms), self._spawn(name))
        return names

    def adopt(self, name: str, handle: Handle, now_ms: float) -> None:
        """Take in a worker a previous broker started (it is ready at its birth, which
        the fleet's retained status shows at once; no cold start is learnt from it)."""
        self._workers[name] = (Worker(name, now_ms), handle)
        self._adopted.add(name)

    def _in_use(self, name: str, online: Callable[[str], bool]) -> bool:
        """Is this free name still online: another pool's worker, or our own last one
        whose death message has not reached the fleet yet?"""
        if not online(name):
            self._foreign_names.discard(name)
            self._reaped.discard(name)
            return False
        if name in self._reaped:
            return True  # our own last process: its death message is still on its way
        if name not in self._foreign_names:  # once per episode, not every interval
            self._foreign_names.add(name)
            log.warning("pool worker name %s is online already and not this pool's: "
                        "skipping it (another broker's pool? give each broker its own "
                        "worker_prefix under [broker.autoscale])", name)
        return True

    def stop(self, names: Sequence[str], now_ms: float) -> None:
        for name in names:
            _, proc = self._workers.pop(name)
            if proc.poll() is None:
                proc.terminate()  # the agent publishes its death and exits
            self._stopping[name] = (proc, now_ms + self.grace_s * 1000)

    def born(self, name: str, now_ms: float) -> float | None:
        entry = self._workers.get(name)
        if entry is None or entry[0].ready:
            return None
        worker, proc = entry
        self._failed_starts = 0
        self._workers[name] = (replace(worker, ready_ms=now_ms), proc)
        if name in self._adopted:
            self._adopted.discard(name)
            return None
        cold_ms = now_ms - worker.asked_ms
        self._cold_starts.append(cold_ms)
        return cold_ms

    def left(self, name: str, now_ms: float) -> None:
        pass  # the process's exit, seen by poll(), is what ends a stop here

    def poll(self, now_ms: float) -> list[str]:
        for name, (proc, kill_at) in list(self._stopping.items()):
            if proc.poll() is not None:
                del self._stopping[name]  # reaped
                self._reaped.add(name)
            elif now_ms >= kill_at:
                log.warning("pool worker %s still running %.0f s after SIGTERM: killed",
                            name, self.grace_s)
                proc.kill()  # reaped by a later poll
        lost = [name for name, (_, proc) in self._workers.items() if proc.poll() is not None]
        for name in lost:
            worker, proc = self._workers.pop(name)
            self._reaped.add(name)
            when = "the next scale decision replaces it"
            if not worker.ready:
                self._failed_starts += 1
                hold_s = min(BACKOFF_MAX_S, BACKOFF_S * 2 ** (self._failed_starts - 1))
                self._hold_until_ms = max(self._hold_until_ms, now_ms + hold_s * 1000)
                when = f"it never came up: no new worker for {hold_s:.0f} s"
            log.warning("pool worker %s exited unasked with code %s (its log: %s); %s", name,
                        proc.returncode, self.log_dir / f"{name}.log" if self.log_dir else "-",
                        when)
        return lost

    def workers(self) -> list[Worker]:
        return [w for w, _ in self._workers.values()]

    def stopping(self) -> list[str]:
        return list(self._stopping)

    def view(self) -> PoolView:
        ready = sum(w.ready for w in self.workers())
        cold, self._cold_starts = tuple(self._cold_starts), []
        return PoolView(ready=ready, starting=len(self._workers) - ready, slots=self.slots,
                        cold_starts_ms=cold)

    def close(self) -> None:
        procs = [p for p, _ in self._stopping.values()]
        if self.keep_on_close:
            log.info("pool workers %s left running for the next broker to adopt",
                     ", ".join(self._workers) or "(none)")
        else:
            procs += [p for _, p in self._workers.values()]
        terminate(procs, self.grace_s)
        self._workers.clear()
        self._stopping.clear()
        self._on_close()


def local_pool(home: Home, mqtt_url: str, config: AutoscaleConfig) -> WorkerPool:
    """Workers that run ``config.models`` from ``home`` as processes here, logging to
    HOME/logs/pool/. What a worker needs is checked here, so that a bad setup fails at
    start rather than as a crash every interval."""
    names = worker_names(config)
    check_home(home, mqtt_url, config.models, names)
    log_dir = home.path / "logs" / "pool"
    log_dir.mkdir(parents=True, exist_ok=True)
    # A worker stops with the broker, even one killed with SIGKILL: it must not
    # keep a GPU, nor contend with the next broker's worker of the same name.
    extra = (*worker_args(config), "--parent-pid", str(os.getpid()))

    def run_worker(name: str) -> subprocess.Popen[bytes]:
        gpu = config.gpus[names.index(name) % len(config.gpus)] if config.gpus else None
        on_gpu = ("--gpu", str(gpu)) if gpu is not None else ()
        args = agent_args(home, mqtt_url, name, config.models, "cloud", *extra, *on_gpu)
        # Its own session: a Ctrl-C meant for the broker must not reach the workers
        # first (they would look like crashes); the broker stops them in order.
        return spawn(args, log_dir / f"{name}.log", start_new_session=True)

    return WorkerPool(run_worker, names, models=config.models, slots=config.slots,
                      grace_s=config.stop_grace_s, log_dir=log_dir)


def worker_args(config: AutoscaleConfig) -> list[str]:
    """The ``skyhop agent`` options every backend's worker runs with."""
    args = ["--concurrency", str(config.slots)]
    if config.providers:
        args += ["--providers", ",".join(config.providers)]
    return args


def worker_names(config: AutoscaleConfig) -> list[str]:
    return [f"{config.worker_prefix}-{i}" for i in range(1, config.max_size + 1)]


def check_home(home: Home, mqtt_url: str, models: Sequence[str], names: Sequence[str]) -> None:
    catalog = home.catalog()
    for model in models:
        catalog.get(model)  # a ConfigError that lists the catalog's models
    if not any(home.keys_dir.glob("worker-*.pem")):
        raise ConfigError(
            f"a local pool's workers open requests with the fleet's worker keys, and "
            f"{home.keys_dir} has none: copy keys/worker-*.pem from the home made by "
            f"`skyhop init` (the broker process itself never reads them)"
        )
    if MqttUrl.parse(mqtt_url).tls:
        from skyhop.security.pki import Pki

        pki = Pki(home.path)
        missing = [n for n in names if not pki.cert_path(n).exists()]
        if missing:
            raise ConfigError(
                f"over mqtts each pool worker connects with its own certificate, and "
                f"{', '.join(missing)} have none: run `skyhop certs issue NAME --role cloud "
                f"--home {home.path}` for each, then `skyhop mosquitto-config` and SIGHUP "
                f"Mosquitto"
            )
