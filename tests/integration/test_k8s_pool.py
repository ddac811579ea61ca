"""The ``kubernetes`` pool backend, against a stand-in API server (tests/integration/
kube_fake.py: no Kubernetes cluster runs on this machine) whose pods run real agents.

Real here: the official client's HTTP requests and the responses' shapes, the broker,
Mosquitto with mutual TLS and per-identity rights, the Secret that `skyhop k8s render`
makes (unpacked by `skyhop k8s unpack` in each pod's init container, as the kubelet would
mount it), the agents and ONNX Runtime. Modelled: the ReplicaSet's and kubelet's
behaviour (scheduling, the deletion order, restarts, readiness probes).
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from skyhop.client import Client
from skyhop.dev.localstack import LocalStack
from skyhop.dev.mosquitto import TlsMosquitto, free_port
from skyhop.protocol.topics import Topics
from skyhop.security.pki import Pki
from tests.integration.conftest import IDENTITIES
from tests.integration.fleet import add_busy_model, make_home
from tests.integration.test_pool import (
    X,
    _grow_to_two,
    _pool,
    _serving,
    _wait,
)

pytest.importorskip("kubernetes")
from cloud_broker.k8s_pool import COST, VICTIM_COST, KubeApi, Sizer
from skyhop.deploy import kubernetes
from tests.integration.kube_fake import NS, FakeCluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
SLOTS = 3
POOL = f"""
[broker.autoscale]
backend = "kubernetes"
models = ["busy"]
max_size = {SLOTS}
interval_ms = 500
downscale_delay_ms = 2000
cold_start_prior_ms = 3000
stop_grace_s = 5
"""


def _secret_volume(home, root: Path) -> Path:
    """The Secret skyhop-pool as the kubelet mounts it: one file per key."""
    cluster = kubernetes.Cluster(models=("busy",), max_size=SLOTS)
    docs = kubernetes.render(home, cluster, dt.datetime.now(dt.timezone.utc))
    pool = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] ==
                "skyhop-pool")
    volume = root / "secret-skyhop-pool"
    volume.mkdir()
    for key, value in pool["data"].items():
        (volume / key).write_bytes(base64.b64decode(value))
    return volume


@contextmanager
def _k8s_fleet(root: Path, monkeypatch) -> Iterator[tuple[LocalStack, Client, FakeCluster]]:
    home = make_home(root)
    add_busy_model(home, side=256, layers=192)  # the same work in a model under 1 MiB
    config = home.path / "config.toml"
    config.write_text(config.read_text().replace("status_interval_s = 1.0",
                                                 "status_interval_s = 0.2") + POOL)
    pki = Pki(home.path)
    pki.init()
    for name, role in IDENTITIES.items():
        pki.issue(name, role)
    volume = _secret_volume(home, root)  # issues pool-1 … pool-3: Mosquitto grants them
    logs = root / "logs"
    ports: dict[str, int] = {}
    with TlsMosquitto.start(home.path, prefix=home.config().prefix) as server:

        def run_pod(pod: str, stage: str):
            env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
            env |= {"POD_NAME": pod, "POD_NAMESPACE": NS, "KUBECONFIG": str(cluster.kubeconfig)}
            pod_home = root / "pods" / pod
            skyhop = [sys.executable, "-m", "skyhop"]
            if stage == "init":
                argv = [*skyhop, "k8s", "unpack", "--secrets", str(volume), "--home",
                        str(pod_home), "--slot-from-pod", "--timeout", "120"]
                return argv, env, logs / f"{pod}.log", None
            port = ports.setdefault(pod, free_port())
            argv = [*skyhop, "agent", "--home", str(pod_home), "--mqtt", server.url,
                    "--providers", "cpu", "--metrics-port", str(port), "--hold-after-drain"]
            return argv, env, logs / f"{pod}.log", f"http://127.0.0.1:{port}/readyz"

        logs.mkdir()
        with (
            FakeCluster(run_pod, root, grace_s=15) as cluster,
            LocalStack(home, server.url, logs, server) as stack,
        ):
            monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
            monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
            stack.broker()
            tls = home.tls(server.url, "client-1")
            with Client(server.url, home.fleet_public(), topics=Topics(home.config().prefix),
                        client_id="client-1", tls=tls, slack_ms=30_000) as client:
                yield stack, client, cluster


def test_a_kubernetes_pool_grows_drains_its_chosen_pods_and_shrinks(tmp_path, monkeypatch):
    with _k8s_fleet(tmp_path, monkeypatch) as (stack, client, cluster):
        first = _grow_to_two(stack, client, "kubernetes")
        assert [w["node"] for w in first["workers"]] == ["pool-1"]  # a slot, not a pod name
        cluster.wait("the pool back to one pod",
                     lambda: cluster.replicas == 1 and len(cluster.pods) == 1, 90)
        settled = _wait("the broker's pool back at one", lambda: (p := _pool(stack))
                        and (p["target"], p["ready"], p["stopping"]) == (1, 1, 0) and p, 30,
                        stack)
        assert [w["state"] for w in settled["workers"]] == ["ready"]
        # Every pod the ReplicaSet removed was one the broker had marked. Those ready when
        # chosen were drained first; one chosen while starting went at once (it may come
        # up just before its SIGTERM: its death then re-places anything it was given).
        assert cluster.deleted and all(p.annotations.get(COST) == VICTIM_COST
                                       for p in cluster.deleted)
        logs = [(stack.log_dir / f"{p.name}.log").read_text() for p in cluster.deleted]
        drained = [log for log in logs if "draining: no new work" in log]
        assert drained and all(" drained\n" in log for log in drained), logs
        broker_log = (stack.log_dir / "broker.log").read_text()
        assert "image pull and start" in broker_log  # the cold start's parts


def test_a_restarted_broker_adopts_the_running_pods(tmp_path, monkeypatch):
    with _k8s_fleet(tmp_path, monkeypatch) as (stack, client, cluster):
        _wait("a first worker pod", lambda: _serving(stack), 120, stack)
        created = cluster.created
        broker = stack.procs.pop("broker")
        broker.send_signal(signal.SIGTERM)
        assert broker.wait(timeout=60) == 0
        assert cluster.replicas == 1 and len(cluster.pods) == 1  # the pool outlived it
        stack.watcher().latest = None  # the old broker's retained status is no news
        stack.broker()
        pool = _wait("the new broker's pool", lambda: (p := _pool(stack)) and p["ready"] == 1
                     and p, 60, stack)
        assert [w["node"] for w in pool["workers"]] == ["pool-1"]
        assert cluster.created == created, cluster.show()  # adopted, none started anew
        _wait("the new broker sizing the pool", lambda: (stack.log_dir / "broker.log")
              .read_text().count("now sizes the pool") == 2, 30, stack)
        assert "1 replicas, 1 pods" in (stack.log_dir / "broker.log").read_text()
        assert client.infer("busy", X, budget_ms=10_000).header.where == "cloud"


def test_one_broker_replica_sizes_the_pool(tmp_path, monkeypatch):
    """Two brokers, one Lease: the second waits while the first renews, and takes over
    once the first has been silent for the lease's duration, timed on its own clock."""
    with FakeCluster(lambda pod, stage: ([], {}, tmp_path, None), tmp_path) as cluster:
        monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        now = [0.0]
        a = Sizer(KubeApi(NS, "skyhop-worker"), "broker-a", lambda: now[0])
        b = Sizer(KubeApi(NS, "skyhop-worker"), "broker-b", lambda: now[0])
        assert a.tick() and not b.tick()
        now[0] += 10
        assert a.tick() and not b.tick()  # renewed: b's wait starts again
        now[0] += 16  # a silent for longer than the lease
        assert b.tick() and not a.tick()
        assert cluster.leases["skyhop-worker-sizer"][1]["spec"]["holderIdentity"] == "broker-b"
        assert ("PUT", f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/"
                "skyhop-worker-sizer") in cluster.requests
