"""The cloud pool on Kubernetes: one Deployment of workers, sized by its scale subresource.

    pool = kubernetes_pool(home, mqtt_url, config)   # [broker.autoscale] backend = "kubernetes"

Each pod runs ``skyhop k8s worker``, which waits for the broker to give it a *slot* (a
node id, ``pool-1`` … ``pool-{max_size}``, written on the pod as the ``skyhop.dev/node``
annotation), then runs ``skyhop agent --role cloud`` as that node with that slot's
certificate. Slots exist because over mqtts an identity is a certificate's CN, and
Mosquitto 2.0's dynamic-security ACLs name each one (no ``%c`` patterns before 2.1),
while a Deployment's pods have random names: the slots are the pool's identities, issued
once by ``skyhop k8s render``, and the broker hands out a free one to each new pod.

A worker moves through *asked* (the replicas were raised; no pod is scheduled yet),
*scheduled* (bound to a node: pulling its image), *starting* (its container runs:
loading models) and *ready* (its birth seen on MQTT): the first three from the pods'
phases, the last from the fleet. Ask → birth on the broker's clock is the cold start fed
to ``scale()``; its parts (scheduling, image pull and start, model load) are logged.

Scale-down loses nothing and picks its victims: ``choose_stop`` names them (the idle
ones), each is marked with ``controller.kubernetes.io/pod-deletion-cost`` and, if ready,
drained over MQTT (it takes no new work, answers what it holds, publishes its death and
fails its readiness probe). Only then is the replica count lowered, and the ReplicaSet
removes the marked pods: among pods that are not ready, the lowest cost goes first.

Several broker replicas may watch one pool; the one holding the Lease
``{deployment}-sizer`` sizes it (``active``), the others only report it. A broker that
restarts adopts what runs: the replica count, the pods and their slots are read back,
and a slot already online is ready at once (no cold start is learnt from it).

No Kubernetes cluster runs where this was written: the backend is tested against the
official client's requests and responses, served by a stand-in API server with a
ReplicaSet and kubelet of its own that run real agents (tests/integration/kube_fake.py).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from cloud_broker.autoscaler import PoolView
from cloud_broker.config import AutoscaleConfig
from cloud_broker.pool import BACKOFF_MAX_S, BACKOFF_S, Worker, worker_names
from skyhop.errors import ConfigError
from skyhop.home import Home
from skyhop.logthrottle import LogThrottle

log = logging.getLogger("skyhop.broker")
SLOT = "skyhop.dev/node"  # the pod's node id, written by the sizing broker
COST = "controller.kubernetes.io/pod-deletion-cost"
VICTIM_COST = "-1000"  # below every other pod's (0 when unset)
LIST_EVERY_S = 1.0  # how often the pods are read back (and writes retried)
LEASE_S = 15  # a sizer silent this long (as its peers see it) is replaced


@dataclass(frozen=True)
class Pod:
    """What the pool needs of a pod, read from the API's V1Pod."""

    name: str
    slot: str | None  # the node id it was given
    scheduled: bool
    running: bool  # its container has started (pulling and creating are over)
    ready: bool  # its readiness probe passes
    deleting: bool
    restarts: int
    created: dt.datetime | None = None
    scheduled_at: dt.datetime | None = None
    started_at: dt.datetime | None = None

    @property
    def phase(self) -> str:
        return "starting" if self.running else "scheduled" if self.scheduled else "asked"


def pod_from_api(pod: Any) -> Pod:
    meta, status = pod.metadata, pod.status
    conditions = {c.type: c for c in (status.conditions or [])} if status else {}
    containers = (status.container_statuses or []) if status else []
    running = [c.state.running for c in containers if c.state and c.state.running]
    scheduled = conditions.get("PodScheduled")
    return Pod(
        name=meta.name,
        slot=(meta.annotations or {}).get(SLOT),
        scheduled=scheduled is not None and scheduled.status == "True",
        running=bool(running),
        ready=(c := conditions.get("Ready")) is not None and c.status == "True",
        deleting=meta.deletion_timestamp is not None
        or (status is not None and status.phase in ("Succeeded", "Failed")),
        restarts=sum(c.restart_count or 0 for c in containers),
        created=meta.creation_timestamp,
        scheduled_at=scheduled.last_transition_time if scheduled is not None else None,
        started_at=running[0].started_at if running else None,
    )


def free_slots(slots: Sequence[str], pods: Sequence[Pod]) -> list[str]:
    """The slots no pod holds (a terminating one still does: it may still be online)."""
    held = {p.slot for p in pods}
    return [s for s in slots if s not in held]


class KubeApi:
    """The few calls the pool makes, over the official client (extra ``k8s``)."""

    def __init__(self, namespace: str, deployment: str, context: str | None = None) -> None:
        try:
            import kubernetes
        except ImportError:
            raise ConfigError("the kubernetes pool backend needs the Kubernetes client: "
                              "pip install 'skyhop[k8s]'") from None
        self.k = kubernetes
        load_config(kubernetes, context)
        self.namespace, self.deployment = namespace, deployment
        self.apps = kubernetes.client.AppsV1Api()
        self.core = kubernetes.client.CoreV1Api()
        self.coordination = kubernetes.client.CoordinationV1Api()
        import urllib3

        # What an unreachable or refusing API raises: a broker tick must survive each.
        self.errors: tuple[type[BaseException], ...] = (
            kubernetes.client.ApiException, urllib3.exceptions.HTTPError, OSError)

    def scale(self) -> tuple[int, str]:
        """The Deployment's replicas and its pods' label selector."""
        s = self.apps.read_namespaced_deployment_scale(self.deployment, self.namespace)
        replicas = s.spec.replicas if s.spec is not None else None
        selector = s.status.selector if s.status is not None else None
        if not selector:
            raise ConfigError(f"deployment {self.namespace}/{self.deployment} reports no pod "
                              f"selector on its scale subresource")
        return int(replicas or 0), selector

    def set_replicas(self, n: int) -> None:
        self.apps.patch_namespaced_deployment_scale(
            self.deployment, self.namespace, {"spec": {"replicas": n}})

    def pods(self, selector: str) -> list[Pod]:
        items = self.core.list_namespaced_pod(self.namespace, label_selector=selector).items
        return [pod_from_api(p) for p in items]

    def annotate(self, pod: str, annotations: dict[str, str]) -> None:
        self.core.patch_namespaced_pod(pod, self.namespace,
                                       {"metadata": {"annotations": annotations}})

    def lease(self) -> Any | None:
        try:
            return self.coordination.read_namespaced_lease(self.lease_name, self.namespace)
        except self.k.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def write_lease(self, current: Any | None, holder: str, transitions: int) -> bool:
        """Take or renew the lease; False if another writer got there first (409)."""
        c = self.k.client
        now = dt.datetime.now(dt.timezone.utc)
        spec = c.V1LeaseSpec(holder_identity=holder, lease_duration_seconds=LEASE_S,
                             renew_time=now, acquire_time=now, lease_transitions=transitions)
        try:
            if current is None:
                body = c.V1Lease(metadata=c.V1ObjectMeta(name=self.lease_name), spec=spec)
                self.coordination.create_namespaced_lease(self.namespace, body)
            else:
                if current.spec.holder_identity == holder:
                    spec.acquire_time = current.spec.acquire_time
                current.spec = spec  # its resourceVersion makes the write conditional
                self.coordination.replace_namespaced_lease(self.lease_name, self.namespace,
                                                           current)
        except c.ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    @property
    def lease_name(self) -> str:
        return f"{self.deployment}-sizer"


def load_config(kubernetes: Any, context: str | None) -> None:
    """In a pod, its service account; elsewhere KUBECONFIG (or ~/.kube/config)."""
    if os.environ.get("KUBERNETES_SERVICE_HOST") and context is None:
        kubernetes.config.load_incluster_config()
        return
    try:
        # KUBECONFIG as it is now: the client reads it once, when first imported.
        kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"),
                                           context=context)
    except (kubernetes.config.ConfigException, OSError) as exc:
        raise ConfigError(f"no Kubernetes API to reach: not in a pod, and the kubeconfig "
                          f"failed ({exc}); set KUBECONFIG, or kube_context under "
                          f"[broker.autoscale]") from None


class Sizer:
    """Leader election over a Lease, with the peers' renewals timed on this clock (as
    client-go does): the holder's clock is never compared with ours."""

    def __init__(self, api: KubeApi, holder: str, clock: Callable[[], float] = time.monotonic):
        self.api, self.holder, self.clock = api, holder, clock
        self.leading = False
        self._seen: tuple[Any, float] | None = None  # (the holder's renew_time, when seen)

    def tick(self) -> bool:
        lease = self.api.lease()
        spec = lease.spec if lease is not None else None
        now = self.clock()
        if spec is not None and spec.holder_identity not in (self.holder, ""):
            if self._seen is None or self._seen[0] != spec.renew_time:
                self._seen = (spec.renew_time, now)
            if now - self._seen[1] < (spec.lease_duration_seconds or LEASE_S):
                self._lead(False, spec.holder_identity)
                return False
        transitions = (spec.lease_transitions or 0) if spec is not None else 0
        if spec is not None and spec.holder_identity != self.holder:
            transitions += 1  # "" (released) counts: the pool changes hands
        self._lead(self.api.write_lease(lease, self.holder, transitions), None)
        return self.leading

    def release(self) -> None:
        """Hand the lease back (a clean stop), so that a peer takes over at once."""
        if not self.leading:
            return
        lease = self.api.lease()
        if lease is not None and lease.spec is not None and (
                lease.spec.holder_identity == self.holder):
            self.api.write_lease(lease, "", lease.spec.lease_transitions or 0)
        self._lead(False, None)

    def _lead(self, leading: bool, other: str | None) -> None:
        if leading != self.leading:
            log.info("kubernetes pool: this broker %s the pool (%s)",
                     "now sizes" if leading else "no longer sizes", other or self.holder)
        self.leading = leading


class KubernetesPool:
    """The pool's account over one Deployment (``PoolBackend``).

    The broker calls it under its own lock, so it never waits on the API there: its verbs
    change the account and queue writes (annotations in order, then the replica count it
    wants), and a thread of its own (``background``) applies them, renews the Lease and
    reads the pods back every ``LIST_EVERY_S``; ``poll`` takes the latest reading. An API
    that fails or hangs delays the pool, never a request. A write that fails is retried,
    and the replica count is lowered only once the annotations queued before it are in."""

    kind = "kubernetes"
    drain_over_mqtt = True

    def __init__(self, api: KubeApi, config: AutoscaleConfig, *, holder: str | None = None,
                 clock: Callable[[], float] = time.monotonic, background: bool = True) -> None:
        self.api = api
        self.models = tuple(config.models)
        self.slots = config.slots
        self.grace_ms = config.stop_grace_s * 1000
        self._slot_names = worker_names(config)
        self._sizer = Sizer(api, holder or f"{socket.gethostname()}-{os.getpid()}", clock)
        self._replicas, self._selector = api.scale()
        self._pods: dict[str, Pod] = {}
        self._asks: deque[float] = deque()  # ask times not yet matched to a pod
        self._asked: dict[str, float] = {}  # pod -> when it was asked for
        self._ready: dict[str, float] = {}  # slot -> birth
        self._adopted: set[str] = set()  # pods running when this broker started
        self._draining: dict[str, float] = {}  # slot -> when its drain was ordered
        self._stopping: set[str] = set()  # pods asked to go, until they have
        self._cold_starts: list[float] = []
        self._unexplained: dict[str, float] = {}  # pod -> cold start not yet broken down
        self._failed_starts = 0
        self._hold_until_ms = 0.0
        # Shared with the I/O thread, under _io:
        self._io = threading.Lock()
        self._writes: list[tuple[str, dict[str, str]]] = []  # annotations not yet written
        self._written = self._replicas  # the replica count the API holds
        self._reading: list[Pod] | None = None  # pods read back, not yet taken by poll()
        self._leading = False
        self._errors = LogThrottle(30_000.0)
        self._halt = threading.Event()
        self._refresh(api.pods(self._selector), adopt=True)
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._io_loop, name="skyhop-k8s-pool",
                                            daemon=True)
            self._thread.start()
        log.info("kubernetes pool %s/%s: %d replicas, %d pods", api.namespace,
                 api.deployment, self._replicas, len(self._pods))

    @property
    def active(self) -> bool:
        return self._leading

    # -- the autoscaler's verbs ---------------------------------------------------------

    def start(self, n: int, now_ms: float,
              online: Callable[[str], bool] = lambda name: False) -> list[str]:
        if n <= 0 or now_ms < self._hold_until_ms or not self.active:
            return []
        n = min(n, len(self._slot_names) - self._replicas)
        if n <= 0:
            return []
        self._set_replicas(self._replicas + n)
        self._asks.extend([now_ms] * n)
        return [f"asked-{i}" for i in range(len(self._asks) - n + 1, len(self._asks) + 1)]

    def stop(self, names: Sequence[str], now_ms: float) -> None:
        if not self.active:
            return
        by_name = {self._name(p): p for p in self._live()}
        lower = 0
        for name in names:
            pod = by_name.get(name)
            if pod is None:  # asked for, no pod yet: fewer replicas is all it takes
                if self._asks:
                    self._asks.pop()
                lower += 1
                continue
            self._annotate(pod.name, {COST: VICTIM_COST})  # before the replicas fall
            self._stopping.add(pod.name)
            if pod.slot in self._ready:
                self._draining[pod.slot] = now_ms  # the broker orders its drain on MQTT
            else:
                lower += 1  # it serves nothing yet
        if lower:
            self._set_replicas(self._replicas - lower)

    def born(self, name: str, now_ms: float) -> float | None:
        pod = self._by_slot(name)
        if pod is None or name in self._ready:
            return None
        self._ready[name] = now_ms
        self._failed_starts = 0
        if pod.name in self._adopted:
            return None  # it was running before this broker: no cold start to learn
        cold_ms = now_ms - self._asked.get(pod.name, now_ms)
        self._cold_starts.append(cold_ms)
        self._unexplained[pod.name] = cold_ms  # its parts, once the pod's times are read
        return cold_ms

    def left(self, name: str, now_ms: float) -> None:
        if name in self._draining:
            del self._draining[name]
            self._set_replicas(self._replicas - 1)  # the ReplicaSet removes the marked pod
        self._ready.pop(name, None)

    def poll(self, now_ms: float) -> list[str]:
        if self._thread is None:
            self.sync()  # no thread of its own (tests): the API round happens here
        with self._io:
            pods, self._reading = self._reading, None
        if pods is None:
            return []
        lost = self._refresh(pods, now_ms=now_ms)
        if self.active:
            self._assign()
            self._expire_drains(now_ms)
        return lost

    def workers(self) -> list[Worker]:
        live = [p for p in self._live() if p.slot not in self._draining]
        asked = max(0, self._replicas - len(self._live()))
        return [self._worker(p) for p in live] + [
            Worker(f"asked-{i + 1}", t, phase="asked")
            for i, t in enumerate(list(self._asks)[:asked])]

    def stopping(self) -> list[str]:
        return sorted(self._draining) + sorted(
            self._name(self._pods[p]) for p in self._stopping
            if p in self._pods and self._pods[p].slot not in self._draining)

    def view(self) -> PoolView:
        workers = self.workers()
        ready = sum(w.ready for w in workers)
        cold, self._cold_starts = tuple(self._cold_starts), []
        return PoolView(ready=ready, starting=len(workers) - ready, slots=self.slots,
                        cold_starts_ms=cold)

    def close(self) -> None:
        """The pool outlives the broker (a restart adopts it): nothing is stopped, but
        what was queued is written and the Lease handed back."""
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self._write()
            self._sizer.release()
        except self.api.errors as exc:
            log.warning("kubernetes pool: at close the API failed (%s); a peer takes over "
                        "within %d s", str(exc).splitlines()[0], LEASE_S)
        log.info("kubernetes pool %s/%s left running with %d replicas", self.api.namespace,
                 self.api.deployment, self._written)

    # -- the API round (its own thread) -----------------------------------------------------

    def _io_loop(self) -> None:
        self.sync()
        while not self._halt.wait(LIST_EVERY_S):
            self.sync()

    def sync(self) -> None:
        """One round: the queued writes, the Lease, the pods read back."""
        try:
            self._write()
            leading = self._sizer.tick()
            pods = self.api.pods(self._selector)
        except self.api.errors as exc:
            held = self._errors.admit("api", time.monotonic() * 1000)
            if held is not None:
                log.warning("kubernetes pool: the API failed (%s); retrying, with the last "
                            "view meanwhile%s", str(exc).splitlines()[0],
                            LogThrottle.suffix(held))
            return
        with self._io:
            self._reading, self._leading = pods, leading

    def _write(self) -> None:
        while True:
            with self._io:
                head = self._writes[0] if self._writes else None
                want = self._replicas
            if head is None:
                break
            self.api.annotate(*head)
            with self._io:
                self._writes.pop(0)
        if want != self._written:
            self.api.set_replicas(want)
            self._written = want

    # -- the account ----------------------------------------------------------------------

    def _refresh(self, seen: list[Pod], *, adopt: bool = False,
                 now_ms: float | None = None) -> list[str]:
        """Take a reading of the pods; return the ready workers that went away unasked."""
        pods = {p.name: p for p in seen}
        lost = []
        for old in self._pods.values():
            new = pods.get(old.name)
            gone = new is None or new.deleting
            crashed = new is not None and new.restarts > old.restarts
            if (gone or crashed) and old.slot in self._ready:
                del self._ready[old.slot]
                if gone and old.name in self._stopping:
                    continue  # asked to go; its death message re-places what it held
                lost.append(old.slot)
                log.warning("pool worker %s (pod %s) %s unasked", old.slot, old.name,
                            "restarted" if crashed else "went away")
            elif crashed and now_ms is not None:
                self._crash_loop(old, now_ms)
        for pod in pods.values():
            if pod.name not in self._pods:
                if adopt:
                    self._adopted.add(pod.name)
                self._asked[pod.name] = (self._asks.popleft() if self._asks
                                         else now_ms if now_ms is not None else 0.0)
        for name in set(self._asked) - pods.keys():
            self._asked.pop(name)
            self._stopping.discard(name)
            self._adopted.discard(name)
        # A slot given here stands though the reading predates its write (or the write
        # is still queued): _assign put it in the account first.
        for name, old in self._pods.items():
            if name in pods and old.slot and not pods[name].slot:
                pods[name] = replace(pods[name], slot=old.slot)
        self._pods = pods
        self._explain(pods)
        return [s for s in lost if s is not None]

    def _explain(self, pods: dict[str, Pod]) -> None:
        for name, cold_ms in list(self._unexplained.items()):
            seen = pods.get(name)
            if seen is None or seen.started_at is not None:
                del self._unexplained[name]
            if seen is not None and seen.started_at is not None:
                log.info("pool worker %s (pod %s): cold start %.1f s = %s", seen.slot, name,
                         cold_ms / 1000, _parts(seen, cold_ms))

    def _crash_loop(self, pod: Pod, now_ms: float) -> None:
        self._failed_starts += 1
        hold_s = min(BACKOFF_MAX_S, BACKOFF_S * 2 ** (self._failed_starts - 1))
        self._hold_until_ms = max(self._hold_until_ms, now_ms + hold_s * 1000)
        log.warning("pool pod %s restarted before its birth (kubectl logs -n %s %s "
                    "--previous): no new worker for %.0f s", pod.name, self.api.namespace,
                    pod.name, hold_s)

    def _assign(self) -> None:
        """Give each new pod a free slot: its node id and certificate."""
        waiting = [p for p in self._pods.values() if p.slot is None and not p.deleting]
        for pod, slot in zip(waiting, free_slots(self._slot_names, list(self._pods.values())),
                             strict=False):
            self._annotate(pod.name, {SLOT: slot})
            self._pods[pod.name] = replace(pod, slot=slot)

    def _expire_drains(self, now_ms: float) -> None:
        """A drain that outlasts the grace ends anyway: the pod's SIGTERM follows, and its
        death makes the broker re-place whatever it still holds."""
        for slot, since in list(self._draining.items()):
            if now_ms - since >= self.grace_ms:
                log.warning("pool worker %s still draining after %.0f s: removing it",
                            slot, self.grace_ms / 1000)
                self.left(slot, now_ms)

    def _annotate(self, pod: str, annotations: dict[str, str]) -> None:
        with self._io:
            self._writes.append((pod, annotations))

    def _set_replicas(self, n: int) -> None:
        with self._io:
            self._replicas = max(0, n)

    def _live(self) -> list[Pod]:
        return [p for p in self._pods.values() if not p.deleting
                and (p.name not in self._stopping or p.slot in self._draining)]

    def _by_slot(self, slot: str) -> Pod | None:
        return next((p for p in self._pods.values() if p.slot == slot and not p.deleting), None)

    def _name(self, pod: Pod) -> str:
        return pod.slot or pod.name

    def _worker(self, pod: Pod) -> Worker:
        asked = self._asked.get(pod.name, 0.0)
        born = self._ready.get(pod.slot) if pod.slot else None
        return Worker(self._name(pod), asked, born, phase=pod.phase)


def _parts(pod: Pod, cold_ms: float) -> str:
    """Where a cold start went, from the pod's timestamps (the cluster's clock)."""
    if pod.created is None or pod.scheduled_at is None or pod.started_at is None:
        return "no pod timestamps"
    schedule = (pod.scheduled_at - pod.created).total_seconds()
    pull = (pod.started_at - pod.scheduled_at).total_seconds()
    load = cold_ms / 1000 - schedule - pull
    return f"scheduling {schedule:.1f} s + image pull and start {pull:.1f} s + load {load:.1f} s"


def kubernetes_pool(home: Home, mqtt_url: str, config: AutoscaleConfig) -> KubernetesPool:
    """The pool of the Deployment ``config.deployment`` in ``config.namespace``."""
    del home, mqtt_url  # the pods carry their own home, rendered by `skyhop k8s render`
    api = KubeApi(config.namespace, config.deployment, config.kube_context)
    try:
        return KubernetesPool(api, config)
    except api.errors as exc:
        raise ConfigError(f"kubernetes pool: cannot read deployment {config.namespace}/"
                          f"{config.deployment} ({str(exc).splitlines()[0]}): apply "
                          f"deploy/kubernetes/ and check the broker's RBAC") from None
