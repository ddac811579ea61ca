"""The Kubernetes pool's account (cloud_broker/k8s_pool.py), over an in-memory API: slots,
asked/scheduled/starting/ready, drains before the replicas fall, crash loops, adoption,
and one sizer among replicas. The official client's own requests and responses are
exercised in tests/integration/test_k8s_pool.py."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from typing import Any

import pytest

from cloud_broker.config import AutoscaleConfig
from cloud_broker.k8s_pool import COST, SLOT, VICTIM_COST, KubernetesPool, Pod, free_slots

k = pytest.importorskip("kubernetes.client")
from cloud_broker.k8s_pool import pod_from_api  # noqa: E402

T0 = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)
CONFIG = AutoscaleConfig(backend="kubernetes", models=["digits"], max_size=3, stop_grace_s=5)


class Lease:
    def __init__(self, holder: str) -> None:
        self.spec = k.V1LeaseSpec(holder_identity=holder, lease_duration_seconds=15,
                                  renew_time=T0, lease_transitions=0)


class FakeApi:
    """The KubeApi calls, on a dict of pods; ``leader`` decides who holds the lease."""

    namespace, deployment = "skyhop", "skyhop-worker"
    errors = (OSError,)

    def __init__(self, replicas: int = 0, pods: list[Pod] | None = None,
                 leader: str = "me") -> None:
        self.replicas = replicas
        self.by_name = {p.name: p for p in pods or []}
        self.leader = leader
        self.annotations: dict[str, dict[str, str]] = {}
        self.scaled: list[int] = []

    def scale(self) -> tuple[int, str]:
        return self.replicas, "app=skyhop-worker"

    def set_replicas(self, n: int) -> None:
        self.replicas = n
        self.scaled.append(n)

    def pods(self, selector: str) -> list[Pod]:
        return list(self.by_name.values())

    def annotate(self, pod: str, annotations: dict[str, str]) -> None:
        self.annotations.setdefault(pod, {}).update(annotations)
        if SLOT in annotations and pod in self.by_name:
            self.by_name[pod] = replace(self.by_name[pod], slot=annotations[SLOT])

    def lease(self) -> Any:
        return Lease(self.leader)

    def write_lease(self, current: Any, holder: str, transitions: int) -> bool:
        return current.spec.holder_identity == holder


def pod(name: str, *, slot: str | None = None, stage: str = "running", ready: bool = True,
        restarts: int = 0, deleting: bool = False) -> Pod:
    return Pod(name, slot, scheduled=stage != "pending", running=stage == "running",
               ready=ready, deleting=deleting, restarts=restarts, created=T0,
               scheduled_at=T0 + dt.timedelta(seconds=1),
               started_at=T0 + dt.timedelta(seconds=20) if stage == "running" else None)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 2.0  # every poll reads the pods back
        return self.t


def _pool(api: FakeApi) -> KubernetesPool:
    p = KubernetesPool(api, CONFIG, holder="me", clock=Clock(), background=False)
    p.poll(0)  # takes the lease: poll() runs the API round itself when it has no thread
    return p


def test_pods_are_read_from_the_client_s_own_models() -> None:
    running = k.V1Pod(
        metadata=k.V1ObjectMeta(name="w-1", annotations={SLOT: "pool-2"},
                                creation_timestamp=T0),
        status=k.V1PodStatus(
            phase="Running",
            conditions=[k.V1PodCondition(type="PodScheduled", status="True",
                                         last_transition_time=T0),
                        k.V1PodCondition(type="Ready", status="True")],
            container_statuses=[k.V1ContainerStatus(
                name="agent", image="i", image_id="", ready=True, restart_count=2,
                state=k.V1ContainerState(running=k.V1ContainerStateRunning(started_at=T0)))]))
    p = pod_from_api(running)
    assert (p.slot, p.scheduled, p.running, p.ready, p.restarts, p.phase) == (
        "pool-2", True, True, True, 2, "starting")
    pending = pod_from_api(k.V1Pod(metadata=k.V1ObjectMeta(name="w-2"),
                                   status=k.V1PodStatus(phase="Pending")))
    assert (pending.slot, pending.phase, pending.deleting) == (None, "asked", False)
    gone = pod_from_api(k.V1Pod(metadata=k.V1ObjectMeta(name="w-3", deletion_timestamp=T0)))
    assert gone.deleting


def test_a_terminating_pod_still_holds_its_slot() -> None:
    pods = [pod("a", slot="pool-1", deleting=True), pod("b", slot="pool-3")]
    assert free_slots(["pool-1", "pool-2", "pool-3"], pods) == ["pool-2"]


def test_a_start_raises_the_replicas_and_each_new_pod_gets_a_free_slot() -> None:
    api = FakeApi()
    p = _pool(api)
    assert p.active and p.start(2, 100) == ["asked-1", "asked-2"]
    assert api.replicas == 0  # not under the broker's lock: by the pool's next API round
    p.poll(150)
    assert api.replicas == 2
    assert [(w.name, w.phase) for w in p.workers()] == [("asked-1", "asked"), ("asked-2", "asked")]
    api.by_name = {"w-a": pod("w-a", stage="pending"), "w-b": pod("w-b", stage="scheduled")}
    p.poll(200)  # the pods are read back; their slots queued
    p.poll(250)  # and written
    assert {a[SLOT] for a in api.annotations.values()} == {"pool-1", "pool-2"}
    assert sorted((w.name, w.phase) for w in p.workers()) == [
        ("pool-1", "asked"), ("pool-2", "scheduled")]
    assert p.start(5, 300) == ["asked-1"]  # never past max_size: 3 slots


def test_a_ready_worker_is_drained_before_the_replicas_fall() -> None:
    api = FakeApi()
    p = _pool(api)
    p.start(2, 0)
    p.poll(500)
    api.by_name = {"w-a": pod("w-a"), "w-b": pod("w-b")}
    p.poll(1000)  # they appear, and get pool-1 and pool-2
    assert p.born("pool-1", 3000) == 3000 and p.born("pool-2", 4000) == 4000
    assert p.view().cold_starts_ms == (3000, 4000)
    p.stop(["pool-2"], 5000)
    p.poll(5100)
    assert api.annotations["w-b"][COST] == VICTIM_COST  # the ReplicaSet's choice, made ours
    assert api.replicas == 2 and p.stopping() == ["pool-2"]  # still draining
    assert [w.name for w in p.workers()] == ["pool-1"]
    p.left("pool-2", 5200)  # its death: drained
    p.poll(5300)
    assert api.replicas == 1


def test_a_drain_that_outlasts_the_grace_ends_anyway() -> None:
    api = FakeApi(1, [pod("w-a", slot="pool-1")])
    p = _pool(api)
    p.born("pool-1", 0)
    p.stop(["pool-1"], 1000)
    p.poll(1000 + CONFIG.stop_grace_s * 1000 - 1)
    p.poll(1000 + CONFIG.stop_grace_s * 1000 - 1)
    assert api.replicas == 1
    p.poll(1000 + CONFIG.stop_grace_s * 1000)  # the grace ends: the replicas fall
    p.poll(1000 + CONFIG.stop_grace_s * 1000)
    assert api.replicas == 0


def test_a_worker_not_born_yet_goes_at_once() -> None:
    api = FakeApi(2, [pod("w-a", slot="pool-1", ready=False), pod("w-b", slot="pool-2")])
    p = _pool(api)
    p.born("pool-2", 0)
    p.stop(["pool-1"], 10)
    p.poll(15)
    assert api.replicas == 1 and api.annotations["w-a"][COST] == VICTIM_COST
    p.stop(["asked-1"], 20)  # an ask with no pod: just one replica fewer
    p.poll(25)
    assert api.replicas == 0


def test_a_pod_that_restarts_before_its_birth_holds_back_new_starts() -> None:
    api = FakeApi(1, [pod("w-a", slot="pool-1", ready=False)])
    p = _pool(api)
    api.by_name["w-a"] = replace(api.by_name["w-a"], restarts=1)
    assert p.poll(1000) == []  # not lost: it never served
    assert p.start(1, 2000) == []  # backing off, as the local pool does
    assert p.start(1, 1000 + 10_000) == ["asked-1"]


def test_a_ready_worker_that_restarts_or_vanishes_is_lost() -> None:
    api = FakeApi(2, [pod("w-a", slot="pool-1"), pod("w-b", slot="pool-2")])
    p = _pool(api)
    p.born("pool-1", 0)
    p.born("pool-2", 0)
    api.by_name["w-a"] = replace(api.by_name["w-a"], restarts=1)
    del api.by_name["w-b"]
    assert sorted(p.poll(1000)) == ["pool-1", "pool-2"]


def test_a_broker_that_is_not_the_sizer_only_watches() -> None:
    api = FakeApi(1, [pod("w-a", slot="pool-1")], leader="other")
    p = _pool(api)
    assert not p.active
    assert p.start(2, 0) == [] and api.replicas == 1
    p.stop(["pool-1"], 0)
    assert not api.annotations and [w.name for w in p.workers()] == ["pool-1"]


def test_a_restarted_broker_adopts_pods_without_learning_a_cold_start() -> None:
    api = FakeApi(1, [pod("w-a", slot="pool-1")])
    p = _pool(api)
    assert p.born("pool-1", 50_000) is None  # running before this broker: no cold start
    assert p.view().ready == 1 and api.scaled == []  # nothing asked anew


def test_a_broker_without_the_client_or_a_cluster_says_what_to_do(monkeypatch, tmp_path) -> None:
    import sys

    from cloud_broker.k8s_pool import KubeApi, kubernetes_pool
    from skyhop.errors import ConfigError
    from skyhop.home import Home

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setitem(sys.modules, "kubernetes", None)
    with pytest.raises(ConfigError, match=r"pip install 'skyhop\[k8s\]'"):
        KubeApi("skyhop", "skyhop-worker")
    monkeypatch.undo()
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="set KUBECONFIG"):
        KubeApi("skyhop", "skyhop-worker")
    from skyhop.dev.mosquitto import free_port

    config = tmp_path / "kubeconfig"
    config.write_text(
        '{"apiVersion": "v1", "kind": "Config", "current-context": "x", "clusters": [{"name":'
        f' "x", "cluster": {{"server": "http://127.0.0.1:{free_port()}"}}}}], "contexts": '
        '[{"name": "x", "context": {"cluster": "x", "user": "x"}}], "users": [{"name": "x", '
        '"user": {}}]}')
    monkeypatch.setenv("KUBECONFIG", str(config))
    with pytest.raises(ConfigError, match="cannot read deployment skyhop/skyhop-worker"):
        kubernetes_pool(Home(tmp_path), "mqtt://x", CONFIG)


def test_the_replicas_never_fall_before_the_marks_are_written() -> None:
    """A failed annotation holds back the scale-down: else the ReplicaSet could remove
    a pod the broker did not choose."""
    api = FakeApi(2, [pod("w-a", slot="pool-1", ready=False), pod("w-b", slot="pool-2")])
    p = _pool(api)
    failing = [True]

    def annotate(name: str, annotations: dict[str, str]) -> None:
        if failing[0]:
            raise OSError("the API is down")
        api.annotations.setdefault(name, {}).update(annotations)

    api.annotate = annotate  # type: ignore[method-assign]
    p.stop(["pool-1"], 0)
    p.poll(10)
    assert api.replicas == 2 and not api.annotations
    failing[0] = False
    p.poll(20)  # retried, in order
    assert api.annotations["w-a"][COST] == VICTIM_COST and api.replicas == 1


def test_a_worker_stopped_while_starting_is_not_lost_when_it_goes() -> None:
    """Born between its stop and its pod's removal: it is in stopping() (the broker
    drains it at its birth), and its going is no crash."""
    api = FakeApi(1, [pod("w-a", slot="pool-1", ready=False)])
    p = _pool(api)
    p.stop(["pool-1"], 0)
    assert p.stopping() == ["pool-1"]
    p.born("pool-1", 10)
    del api.by_name["w-a"]
    assert p.poll(20) == [] and p.stopping() == []
