"""A fleet on Kubernetes: ``skyhop k8s render`` and the pods' ``skyhop k8s unpack``.

    docs = render(home, Cluster(namespace="skyhop", models=("digits",), max_size=8), now)
    write(out_dir, docs)                 # kubectl apply -f out_dir
    node = unpack(Path("/etc/skyhop/pool"), Path("/var/lib/skyhop"), slot)   # in a pod

The workloads (namespace, RBAC, the MQTT server, the brokers, the workers) are static
YAML beside this module (``deploy/kubernetes/`` links here); ``render`` reads them, sets
the namespace, images and pool, and adds three Secrets made from the fleet home:

- ``skyhop-mqtt``: Mosquitto's config, the CA, CRL, the server certificate (named for the
  Service) and the rights of every identity (the dynamic-security plugin's file);
- ``skyhop-broker``: each broker replica's home (``slots/skyhop-broker-N/``: config and
  certificate), and what they share (catalog, fleet public key, CA, CRL);
- ``skyhop-pool``: the workers' shared home (catalog, fleet public key, worker keys, CA,
  CRL) and one slot per worker identity, ``pool-1`` … ``pool-{max_size}``.

A Secret's keys cannot hold ``/``, so a home path is stored with ``__`` for each ``/``.
No CA key ever enters a Secret. The pool's slots share one Secret, so every worker pod
can read every slot's key: the pool is one trust domain (as it already is by holding the
worker keys that open every request); per-pod keys would need a per-pod MQTT identity,
which Mosquitto 2.0's dynamic-security ACLs cannot express (docs/pool.md).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skyhop.deploy.bundle import (
    PRIVATE,
    File,
    Node,
    catalog_text,
    fleet_key_file,
    model_files,
    node_config,
    pki_files,
    worker_key_files,
)
from skyhop.errors import ConfigError
from skyhop.home import Home
from skyhop.models import ModelEntry, PathSource
from skyhop.protocol.topics import Topics
from skyhop.security.acl import render as render_rights
from skyhop.security.mosquitto_conf import render as render_mosquitto
from skyhop.security.pki import Pki

MANIFESTS = Path(__file__).parent / "kubernetes"
SERVER = "skyhop-mqtt"  # the MQTT Service, and its certificate's name
MQTT_DIR = "/mosquitto/skyhop"  # where the Mosquitto pod's init container puts its files
PLUGIN = "/usr/lib/mosquitto_dynamic_security.so"  # in the eclipse-mosquitto image
SLOTS = "slots"
SEP = "__"
SECRET_LIMIT = 1024 * 1024  # what the API server stores in one Secret


@dataclass(frozen=True)
class Cluster:
    """What a render needs to know beyond the fleet home."""

    namespace: str = "skyhop"
    models: tuple[str, ...] = ("digits",)
    max_size: int = 4  # pool slots: the most workers at once
    brokers: int = 2
    registry: str = ""  # prefix of the skyhop images, e.g. "ghcr.io/acme/"
    version: str = "0.1.0"

    @property
    def mqtt(self) -> str:
        return f"mqtts://{SERVER}.{self.namespace}.svc:8883"

    def slot_names(self) -> list[str]:
        return [f"pool-{i}" for i in range(1, self.max_size + 1)]

    def broker_names(self) -> list[str]:
        return [f"skyhop-broker-{i}" for i in range(self.brokers)]  # the StatefulSet's pods


def render(home: Home, cluster: Cluster, now: dt.datetime) -> list[dict[str, Any]]:
    """Every object to apply, Secrets included (issuing the certificates they need)."""
    if not Pki(home.path).ca_path.exists():
        raise ConfigError(f"{home.path} has no fleet CA: run `skyhop certs init --home "
                          f"{home.path}`; every pod connects over mutual TLS")
    catalog = home.catalog()
    for model in cluster.models:
        catalog.get(model)  # a ConfigError that lists the catalog's models
    # Identities first: the MQTT server's rights are rendered from the registry after.
    pool = _pool_secret(home, cluster, now)
    brokers = _broker_secret(home, cluster, now)
    mqtt = _mqtt_secret(home, cluster, now)
    return [*(_customise(doc, cluster) for doc in workloads()), mqtt, brokers, pool]


def workloads() -> list[dict[str, Any]]:
    """The static manifests, in apply order (file names sort so)."""
    import yaml

    docs: list[dict[str, Any]] = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def write(out: Path, docs: Iterable[dict[str, Any]]) -> list[Path]:
    """One file per object kind group: workloads as YAML, Secrets 0600 in secrets.yaml."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    docs = list(docs)
    secrets = [d for d in docs if d["kind"] == "Secret"]
    rest = [d for d in docs if d["kind"] != "Secret"]
    paths = [out / "skyhop.yaml", out / "secrets.yaml"]
    paths[0].write_text(yaml.safe_dump_all(rest, sort_keys=False))
    fd = os.open(paths[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE)
    with os.fdopen(fd, "w") as f:
        f.write(yaml.safe_dump_all(secrets, sort_keys=False))
    return paths


# -- the Secrets ------------------------------------------------------------------------


def _pool_secret(home: Home, cluster: Cluster, now: dt.datetime) -> dict[str, Any]:
    entries = [home.catalog().get(m) for m in cluster.models]
    shared = [*_catalog(home, entries), fleet_key_file(home), *worker_key_files(home, now)]
    slots = {name: _slot(home, Node(name, "cloud", cluster.models, cluster.mqtt), now)
             for name in cluster.slot_names()}
    return _secret("skyhop-pool", cluster, _common(shared, slots))


def _broker_secret(home: Home, cluster: Cluster, now: dt.datetime) -> dict[str, Any]:
    fleet = home.config()
    # The catalog names the models; a broker never opens their files.
    shared = [_catalog(home, home.catalog().models)[0], fleet_key_file(home)]
    autoscale = {**fleet.broker.get("autoscale", {}), "backend": "kubernetes",
                 "namespace": cluster.namespace, "deployment": "skyhop-worker",
                 "models": list(cluster.models), "max_size": cluster.max_size}
    broker = {k: v for k, v in fleet.broker.items() if k != "autoscale"}
    tables = _tables({"broker": broker, "broker.autoscale": autoscale})
    slots = {name: _slot(home, Node(name, "broker", tuple(fleet.sla), cluster.mqtt), now,
                         tables)
             for name in cluster.broker_names()}
    return _secret("skyhop-broker", cluster, _common(shared, slots))


def _mqtt_secret(home: Home, cluster: Cluster, now: dt.datetime) -> dict[str, Any]:
    pki = Pki(home.path)
    sans = [SERVER, f"{SERVER}.{cluster.namespace}", f"{SERVER}.{cluster.namespace}.svc",
            f"{SERVER}.{cluster.namespace}.svc.cluster.local"]
    held = [e for e in pki.active(now) if e.name == SERVER]
    if not held or not pki.key_path(SERVER).exists():
        pki.issue(SERVER, "server", sans=sans, now=now, renew=bool(held))
    creds = pki.credentials(SERVER)
    rights = render_rights(pki.entries(), Topics(home.config().prefix), now=now)
    conf = render_mosquitto(MQTT_DIR, 8883, user="mosquitto", persistence="/mosquitto/data",
                            plugin=PLUGIN)
    data = {"mosquitto.conf": conf.encode(), "ca.crt": creds.ca.read_bytes(),
            "server.crt": creds.cert.read_bytes(), "server.key": creds.key.read_bytes(),
            "crl.pem": pki.crl_path.read_bytes(), "dynsec.json": rights.encode()}
    return _secret("skyhop-mqtt", cluster, data)


def _catalog(home: Home, entries: Sequence[ModelEntry]) -> list[File]:
    """The catalog, and the models committed as files (small: a Secret holds 1 MiB). A
    wheel's model is fetched by the pod from PyPI, or baked into the image's cache."""
    local = [e for e in entries if isinstance(e.source, PathSource)]
    text = catalog_text(entries, inline=lambda e: e in local)
    return [File("home/catalog.toml", text.encode()), *model_files(home, local)]


def _slot(home: Home, node: Node, now: dt.datetime, tables: str = "") -> list[File]:
    """One identity's config (with ``tables`` appended) and credentials."""
    config = node_config(home.config(), node) + tables
    return [File("home/config.toml", config.encode()), *pki_files(home, node, now)]


def _common(shared: Sequence[File], slots: Mapping[str, Sequence[File]]) -> dict[str, bytes]:
    """Secret data: files every slot has alike once, the rest under slots/NAME/."""
    data = {_key(f.path): f.data for f in shared}
    for name, files in slots.items():
        for f in files:
            if f.path in ("home/pki/ca.crt", "home/pki/crl.pem"):
                data[_key(f.path)] = f.data
            else:
                data[_key(f"home/{SLOTS}/{name}/" + f.path.removeprefix("home/"))] = f.data
    return data


def _key(path: str) -> str:
    return path.removeprefix("home/").replace("/", SEP)


def _secret(name: str, cluster: Cluster, data: dict[str, bytes]) -> dict[str, Any]:
    import base64

    size = sum(len(v) for v in data.values())
    if size > SECRET_LIMIT:
        biggest = max(data, key=lambda k: len(data[k]))
        raise ConfigError(
            f"Secret {name} would hold {size:,} bytes, over Kubernetes' 1 MiB; the largest "
            f"is {biggest.replace(SEP, '/')} ({len(data[biggest]):,}): give big models a "
            f"wheel source in the catalog (the pods fetch them) or bake them into the image")

    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": cluster.namespace,
                         "labels": {"app.kubernetes.io/part-of": "skyhop"}},
            "data": {k: base64.b64encode(v).decode() for k, v in sorted(data.items())}}


def _tables(tables: dict[str, dict[str, Any]]) -> str:
    from skyhop.deploy.bundle import _toml

    return "".join(f"\n[{name}]\n{_toml(t)}" for name, t in tables.items())


def _customise(doc: dict[str, Any], cluster: Cluster) -> dict[str, Any]:
    """Namespace, images and the pool's size into one static manifest."""
    def edit(s: str) -> str:
        return (s.replace("skyhop.svc", f"{cluster.namespace}.svc")
                .replace("REGISTRY/", cluster.registry).replace(":VERSION", f":{cluster.version}"))

    text: dict[str, Any] = _replace(doc, edit)
    if text["kind"] == "Namespace":
        text["metadata"]["name"] = cluster.namespace
    elif "namespace" in text.get("metadata", {}):
        text["metadata"]["namespace"] = cluster.namespace
    if text["kind"] == "StatefulSet" and text["metadata"]["name"] == "skyhop-broker":
        text["spec"]["replicas"] = cluster.brokers
    for binding in text.get("subjects", []):
        binding["namespace"] = cluster.namespace
    return text


def _replace(value: Any, edit: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return edit(value)
    if isinstance(value, list):
        return [_replace(v, edit) for v in value]
    if isinstance(value, dict):
        return {k: _replace(v, edit) for k, v in value.items()}
    return value


# -- in the pod -------------------------------------------------------------------------


def unpack(secrets: Path, home: Path, node: str) -> list[Path]:
    """Write ``node``'s home from a mounted Secret: the shared files and its own slot,
    not the other slots' keys. Returns the files written."""
    written = []
    prefix = f"{SLOTS}/{node}/"
    names = [p.name for p in secrets.iterdir() if not p.name.startswith("..")]
    if not any(n.startswith(_key(f"home/{prefix}")) for n in names):
        raise ConfigError(f"{secrets} holds no slot {node}: render the Secret again with "
                          f"`skyhop k8s render` for this many workers")
    for name in sorted(names):
        path = name.replace(SEP, "/")
        if path.startswith(f"{SLOTS}/"):
            if not path.startswith(prefix):
                continue  # another slot's
            path = path.removeprefix(prefix)
        target = home / path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(secrets / name, target)
        target.chmod(PRIVATE if path.endswith(".key") or "worker-" in path else 0o644)
        written.append(target)
    return written


def wait_for_slot(read: Callable[[], dict[str, str]], annotation: str,
                  timeout_s: float, poll_s: float = 1.0) -> str:
    """The node id the broker writes on this pod (``read`` returns its annotations)."""
    deadline = time.monotonic() + timeout_s
    while True:
        slot = read().get(annotation)
        if slot:
            return slot
        if time.monotonic() >= deadline:
            raise ConfigError(f"no broker gave this pod a slot ({annotation}) within "
                              f"{timeout_s:.0f} s: is a broker with backend = "
                              f"\"kubernetes\" running, and are its pool's slots all taken?")
        time.sleep(poll_s)
