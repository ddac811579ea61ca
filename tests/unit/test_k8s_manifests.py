"""deploy/kubernetes/ and `skyhop k8s render`: no cluster runs here, so the manifests are
validated offline against the Kubernetes schemas (kubernetes-validate, strict: unknown
fields fail), every skyhop command and flag they run is checked against the CLI, and the
Secrets are checked for what they hold and what they must not."""

from __future__ import annotations

import base64
import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from skyhop.errors import ConfigError
from skyhop.home import Home
from tests.unit.test_containers import cli_options

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
from skyhop.deploy import kubernetes  # noqa: E402

NOW = dt.datetime.now(dt.timezone.utc)
DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
VERSION = "1.30.0"  # the oldest Kubernetes release the manifests are checked against


def _validate(doc: dict[str, Any]) -> None:
    for version in (VERSION, kubernetes_validate.latest_version()):
        kubernetes_validate.validate(doc, version, strict=True)


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("initContainers", []) + spec.get("containers", [])


def _secrets(docs: list[dict[str, Any]]) -> dict[str, dict[str, bytes]]:
    return {d["metadata"]["name"]: {k: base64.b64decode(v) for k, v in d["data"].items()}
            for d in docs if d["kind"] == "Secret"}


def test_deploy_kubernetes_is_the_packaged_manifests() -> None:
    assert DEPLOY.resolve() == kubernetes.MANIFESTS.resolve()
    assert [p.name for p in sorted(DEPLOY.glob("*.yaml"))] == [
        "00-namespace.yaml", "10-rbac.yaml", "20-mqtt.yaml", "30-broker.yaml",
        "40-worker.yaml"]


@pytest.mark.parametrize("doc", kubernetes.workloads(),
                         ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_manifest_is_valid_against_the_schemas(doc: dict[str, Any]) -> None:
    _validate(doc)


def test_the_validator_rejects_a_wrong_field() -> None:
    """The check above can fail: a misspelt field does."""
    doc = next(d for d in kubernetes.workloads() if d["kind"] == "Deployment")
    bad = {**doc, "spec": {**doc["spec"], "replica": 3}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSION, strict=True)


def test_every_skyhop_command_and_flag_in_the_manifests_exists() -> None:
    ran = []
    for doc in kubernetes.workloads():
        for container in _containers(doc):
            argv = container.get("command", []) + container.get("args", [])
            if argv and argv[0] == "skyhop":
                words = [w for w in argv[1:3] if not w.startswith("-")]
                options = cli_options(words)
                flags = [w for w in argv if w.startswith("--")]
                assert set(flags) <= options, (argv, set(flags) - options)
                ran.append(" ".join(words))
    assert sorted(ran) == ["agent", "broker", "k8s unpack", "k8s unpack"]


def test_the_workers_ask_for_a_gpu_and_outlast_their_drain() -> None:
    worker = next(d for d in kubernetes.workloads() if d["kind"] == "Deployment")
    pod = worker["spec"]["template"]["spec"]
    agent = pod["containers"][0]
    assert agent["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu" and pod["nodeSelector"]
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= agent.keys()
    assert agent["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert "--hold-after-drain" in agent["command"]
    from cloud_broker.config import AutoscaleConfig

    assert pod["terminationGracePeriodSeconds"] > AutoscaleConfig().stop_grace_s
    assert worker["spec"]["replicas"] == 0  # the broker sizes it


def test_the_broker_may_touch_only_its_pool() -> None:
    role = next(d for d in kubernetes.workloads()
                if d["kind"] == "Role" and d["metadata"]["name"] == "skyhop-broker")
    scale = next(r for r in role["rules"] if r["resources"] == ["deployments/scale"])
    assert scale["resourceNames"] == ["skyhop-worker"] and scale["verbs"] == ["get", "patch"]
    assert not any("secrets" in r["resources"] or "*" in r["verbs"] for r in role["rules"])


def test_render_is_valid_and_names_the_namespace_and_images(home: Home) -> None:
    cluster = kubernetes.Cluster(namespace="fleet-a", max_size=3, registry="reg.example/")
    docs = kubernetes.render(home, cluster, NOW)
    for doc in docs:
        _validate(doc)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "fleet-a"
    images = {c["image"] for d in docs for c in _containers(d) if "skyhop" in c["image"]}
    assert images == {"reg.example/skyhop-broker:0.1.0", "reg.example/skyhop-worker:0.1.0"}
    broker = _secrets(docs)["skyhop-broker"]["slots__skyhop-broker-0__config.toml"].decode()
    assert 'mqtt = "mqtts://skyhop-mqtt.fleet-a.svc:8883"' in broker
    assert 'backend = "kubernetes"' in broker and 'namespace = "fleet-a"' in broker


def test_the_secrets_hold_each_slot_and_no_ca_key(home: Home) -> None:
    secrets = _secrets(kubernetes.render(home, kubernetes.Cluster(max_size=2), NOW))
    pool = secrets["skyhop-pool"]
    assert {k for k in pool if k.endswith(".key")} == {
        "slots__pool-1__pki__pool-1.key", "slots__pool-2__pki__pool-2.key"}
    assert any(k.startswith("keys__worker-") for k in pool)  # workers open requests
    assert not any(k.startswith("keys__worker-") for k in secrets["skyhop-broker"])
    ca_key = (home.path / "pki" / "ca.key").read_bytes()
    assert all(ca_key not in v for s in secrets.values() for v in s.values())
    mqtt = secrets["skyhop-mqtt"]
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(mqtt["server.crt"])
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "skyhop-mqtt.skyhop.svc" in names.get_values_for_type(x509.DNSName)
    assert b"pool-2" in mqtt["dynsec.json"] and b"skyhop-broker-1" in mqtt["dynsec.json"]
    assert b"listener 8883" in mqtt["mosquitto.conf"]


def test_unpack_gives_a_pod_its_own_slot_only(home: Home, tmp_path: Path) -> None:
    pool = _secrets(kubernetes.render(home, kubernetes.Cluster(max_size=3), NOW))["skyhop-pool"]
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "..data").mkdir()  # the kubelet's own entries are skipped
    for key, value in pool.items():
        (volume / key).write_bytes(value)
    written = kubernetes.unpack(volume, tmp_path / "home", "pool-2")
    names = {p.relative_to(tmp_path / "home").as_posix() for p in written}
    assert {"config.toml", "catalog.toml", "pki/pool-2.crt", "pki/pool-2.key",
            "pki/ca.crt", "models/digits/digits.onnx"} <= names
    assert not any("pool-1" in n or "pool-3" in n for n in names)
    assert (tmp_path / "home" / "pki" / "pool-2.key").stat().st_mode & 0o077 == 0
    from edge_agent.config import load as load_agent

    agent = load_agent(Home(tmp_path / "home"))
    assert (agent.node_id, agent.role, agent.models) == ("pool-2", "cloud", ["digits"])
    Home(tmp_path / "home").catalog().get("digits").example()  # its model file is there
    with pytest.raises(ConfigError, match="holds no slot pool-9"):
        kubernetes.unpack(volume, tmp_path / "other", "pool-9")


def test_a_secret_over_the_api_limit_is_refused(home: Home, monkeypatch) -> None:
    monkeypatch.setattr(kubernetes, "SECRET_LIMIT", 4096)
    with pytest.raises(ConfigError, match=r"over Kubernetes. 1 MiB.*models/digits"):
        kubernetes.render(home, kubernetes.Cluster(), NOW)


def test_render_needs_a_ca_and_known_models(tmp_path: Path, home: Home) -> None:
    bare = Home(tmp_path / "bare")
    bare.init()
    with pytest.raises(ConfigError, match="certs init"):
        kubernetes.render(bare, kubernetes.Cluster(), NOW)
    with pytest.raises(ConfigError, match="nope"):
        kubernetes.render(home, kubernetes.Cluster(models=("nope",)), NOW)
