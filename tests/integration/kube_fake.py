"""A stand-in for one Kubernetes namespace, for tests: no cluster runs on this machine.

    with FakeCluster(run_pod) as cluster:       # cluster.kubeconfig: for KUBECONFIG
        ...                                     # the official client talks to it over HTTP

What is real: the HTTP API the official client speaks (its own request paths, bodies and
content types; responses are its own models, serialised by its ``ApiClient``), and each
pod's containers, which run as processes (``run_pod(pod, container)`` makes their argv).
What is modelled, after the Kubernetes sources and docs, and only as far as skyhop uses
it: a Deployment's scale subresource; its ReplicaSet creating pods and, on scale-down,
deleting them in the controller's order (unscheduled, then pending, then not ready, then
the lowest ``controller.kubernetes.io/pod-deletion-cost``, then the newest); a kubelet
that runs the init container, then the main one, restarts a main container that exits
(restartPolicy Always), probes readiness over HTTP, and on deletion sends SIGTERM, then
SIGKILL after the grace period; Leases with resourceVersion conflicts (409).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import secrets
import subprocess
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from kubernetes import client as k

NS, DEPLOYMENT = "skyhop", "skyhop-worker"
LABELS = {"app.kubernetes.io/name": "skyhop-worker"}
SELECTOR = ",".join(f"{key}={value}" for key, value in LABELS.items())
COST = "controller.kubernetes.io/pod-deletion-cost"
SERIAL = k.ApiClient()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass
class FakePod:
    name: str
    created: dt.datetime = field(default_factory=_now)
    annotations: dict[str, str] = field(default_factory=dict)
    scheduled_at: dt.datetime | None = None
    started_at: dt.datetime | None = None
    deleted_at: dt.datetime | None = None
    ready: bool = False
    restarts: int = 0
    proc: subprocess.Popen[bytes] | None = None
    stage: str = "pending"  # pending -> init -> main (-> gone)
    ready_url: str | None = None

    def model(self) -> k.V1Pod:
        conditions = []
        if self.scheduled_at:
            conditions.append(k.V1PodCondition(type="PodScheduled", status="True",
                                               last_transition_time=self.scheduled_at))
            conditions.append(k.V1PodCondition(type="Ready", status=str(self.ready)))
        state = (k.V1ContainerState(running=k.V1ContainerStateRunning(started_at=self.started_at))
                 if self.stage == "main" else
                 k.V1ContainerState(waiting=k.V1ContainerStateWaiting(reason="PodInitializing")))
        statuses = [k.V1ContainerStatus(name="agent", image="skyhop-worker:0.1.0", image_id="",
                                        ready=self.ready, restart_count=self.restarts,
                                        state=state)] if self.scheduled_at else None
        return k.V1Pod(
            api_version="v1", kind="Pod",
            metadata=k.V1ObjectMeta(name=self.name, namespace=NS, labels=dict(LABELS),
                                    annotations=dict(self.annotations) or None,
                                    creation_timestamp=self.created,
                                    deletion_timestamp=self.deleted_at, uid=self.name),
            status=k.V1PodStatus(phase="Running" if self.stage == "main" else "Pending",
                                 conditions=conditions or None, container_statuses=statuses))

    def rank(self) -> tuple:
        """The ReplicaSet controller's deletion order: lowest first."""
        cost = int(self.annotations.get(COST, "0"))
        return (self.scheduled_at is not None, self.stage == "main", self.ready, cost,
                -self.created.timestamp())


class FakeCluster:
    """One namespace: the workers' Deployment, its pods, and Leases (see the module doc).
    ``run_pod(pod, stage)`` returns the (argv, env, log path, readiness URL) of the
    pod's ``init`` or ``main`` container."""

    def __init__(self, run_pod: Callable[[str, str], tuple[list[str], dict[str, str], Path,
                                                            str | None]],
                 root: Path, *, grace_s: float = 30.0, schedule_s: float = 0.3) -> None:
        self.run_pod, self.root, self.grace_s, self.schedule_s = run_pod, root, grace_s, schedule_s
        self.replicas = 0
        self.pods: dict[str, FakePod] = {}
        self.deleted: list[FakePod] = []  # in the order the ReplicaSet chose them
        self.created = 0
        self.leases: dict[str, tuple[int, dict[str, Any]]] = {}  # name -> (version, body)
        self.requests: list[tuple[str, str]] = []  # (method, path) as the client sent them
        self.errors: list[str] = []  # the stand-in's own failures: a test asserts none
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.kubeconfig = root / "kubeconfig"
        self.kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake",
                                                      "namespace": NS}}],
            "users": [{"name": "fake", "user": {"token": "fake"}}]}))

    def __enter__(self) -> FakeCluster:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        threading.Thread(target=self._control_loop, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.server.shutdown()
        with self.lock:
            procs = [p.proc for p in self.pods.values() if p.proc is not None]
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # -- the controllers ------------------------------------------------------------------

    def _control_loop(self) -> None:
        while not self._stop.wait(0.1):
            try:
                with self.lock:
                    self._replicaset()
                    for pod in list(self.pods.values()):
                        self._kubelet(pod)
            except Exception as exc:  # a test's bug: say so, and keep the cluster going
                self.errors.append(repr(exc))
                traceback.print_exc()

    def _replicaset(self) -> None:
        live = [p for p in self.pods.values() if p.deleted_at is None]
        for _ in range(self.replicas - len(live)):
            self.created += 1
            name = f"{DEPLOYMENT}-7d9f8-{secrets.token_hex(3)[:5]}"
            self.pods[name] = FakePod(name)
        for pod in sorted(live, key=FakePod.rank)[:max(0, len(live) - self.replicas)]:
            pod.deleted_at = _now()
            self.deleted.append(pod)
            if pod.proc is not None:
                pod.proc.terminate()

    def _kubelet(self, pod: FakePod) -> None:
        if pod.deleted_at is not None:
            gone = pod.proc is None or pod.proc.poll() is not None
            if not gone and (_now() - pod.deleted_at).total_seconds() > self.grace_s:
                pod.proc.kill()
            elif gone:
                del self.pods[pod.name]
            return
        if pod.scheduled_at is None:
            if (_now() - pod.created).total_seconds() >= self.schedule_s:
                pod.scheduled_at, pod.stage = _now(), "init"
                self._run(pod, "init")
            return
        code = pod.proc.poll() if pod.proc is not None else None
        if pod.stage == "init" and code is not None:
            if code == 0:
                pod.stage, pod.started_at = "main", _now()
            else:
                pod.restarts += 1  # an init container that fails runs again
            self._run(pod, pod.stage)
        elif pod.stage == "main" and code is not None:
            pod.restarts += 1
            pod.ready = False
            self._run(pod, "main")
        elif pod.stage == "main":
            pod.ready = self._probe(pod)

    def _run(self, pod: FakePod, stage: str) -> None:
        argv, env, log, pod.ready_url = self.run_pod(pod.name, stage)
        with open(log, "ab") as out:
            pod.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)

    @staticmethod
    def _probe(pod: FakePod) -> bool:
        if pod.ready_url is None:
            return True
        try:
            with urllib.request.urlopen(pod.ready_url, timeout=0.5) as r:
                return r.status == 200
        except OSError:
            return False

    # -- the API server ---------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        cluster = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._route("GET")

            def do_PATCH(self) -> None:
                self._route("PATCH")

            def do_POST(self) -> None:
                self._route("POST")

            def do_PUT(self) -> None:
                self._route("PUT")

            def _route(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                path, _, query = self.path.partition("?")
                with cluster.lock:
                    cluster.requests.append((method, path))
                    code, reply = cluster.serve(method, path, query, body)
                data = json.dumps(SERIAL.sanitize_for_serialization(reply)).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        return Handler

    def serve(self, method: str, path: str, query: str, body: Any) -> tuple[int, Any]:
        apps = f"/apis/apps/v1/namespaces/{NS}/deployments/{DEPLOYMENT}/scale"
        pods = f"/api/v1/namespaces/{NS}/pods"
        leases = f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases"
        if path == apps:
            if method == "PATCH":
                self.replicas = int(body["spec"]["replicas"])
            return 200, k.V1Scale(api_version="autoscaling/v1", kind="Scale",
                                  metadata=k.V1ObjectMeta(name=DEPLOYMENT, namespace=NS),
                                  spec=k.V1ScaleSpec(replicas=self.replicas),
                                  status=k.V1ScaleStatus(replicas=len(self.pods),
                                                         selector=SELECTOR))
        if path == pods and method == "GET":
            assert "labelSelector=" in query, query  # the pool reads only its own pods
            return 200, k.V1PodList(api_version="v1", kind="PodList", metadata=k.V1ListMeta(),
                                    items=[p.model() for p in self.pods.values()])
        if m := re.fullmatch(pods + r"/([^/]+)", path):
            pod = self.pods.get(m[1])
            if pod is None:
                return 404, _status(404, f'pods "{m[1]}" not found')
            if method == "PATCH":
                pod.annotations.update(body["metadata"]["annotations"])
            return 200, pod.model()
        if path == leases and method == "POST":
            name = body["metadata"]["name"]
            if name in self.leases:
                return 409, _status(409, "AlreadyExists")
            return self._store_lease(name, body, 0)
        if m := re.fullmatch(leases + r"/([^/]+)", path):
            held = self.leases.get(m[1])
            if method == "GET":
                return (200, held[1]) if held else (404, _status(404, "NotFound"))
            if held is None or body["metadata"].get("resourceVersion") != str(held[0]):
                return 409, _status(409, "Conflict: the object has been modified")
            return self._store_lease(m[1], body, held[0])
        return 404, _status(404, f"{method} {path}: not in this stand-in")

    def _store_lease(self, name: str, body: dict[str, Any], version: int) -> tuple[int, Any]:
        body["metadata"]["resourceVersion"] = str(version + 1)
        body["metadata"].setdefault("namespace", NS)
        self.leases[name] = (version + 1, body)
        return 200, body

    # -- for the tests --------------------------------------------------------------------

    def wait(self, what: str, check: Callable[[], Any], timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            with self.lock:
                found = check()
            if found:
                return found
            assert time.monotonic() < deadline, f"{what} not within {timeout_s} s: {self.show()}"
            time.sleep(0.1)

    def show(self) -> str:
        with self.lock:
            return f"errors {self.errors}, replicas {self.replicas}, pods " + ", ".join(
                f"{p.name} {p.annotations} {p.stage} ready={p.ready} restarts={p.restarts}"
                f"{' deleting' if p.deleted_at else ''}" for p in self.pods.values())


def _status(code: int, message: str) -> k.V1Status:
    return k.V1Status(api_version="v1", kind="Status", status="Failure", code=code,
                      message=message)
