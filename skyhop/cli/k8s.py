"""``skyhop k8s render`` and ``skyhop k8s unpack`` (skyhop.deploy.kubernetes has the rules)."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Annotated

import typer

from skyhop.errors import ConfigError
from skyhop.home import Home, default_home

app = typer.Typer(help="Run the fleet's brokers, cloud pool and MQTT server on Kubernetes.",
                  no_args_is_help=True)


def _require_yaml() -> None:
    try:
        import yaml  # noqa: F401
    except ImportError:
        raise ConfigError("skyhop k8s needs PyYAML: pip install 'skyhop[k8s]'") from None


@app.command()
def render(
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="Where to write the YAML.")],
    home: Annotated[
        Path | None,
        typer.Option("--home", help="Fleet home. Default: $SKYHOP_HOME, else ~/.skyhop."),
    ] = None,
    namespace: Annotated[str, typer.Option(help="The namespace of every object.")] = "skyhop",
    models: Annotated[
        str, typer.Option(help="Comma-separated models every pool worker serves.")
    ] = "digits",
    max_size: Annotated[
        int, typer.Option(min=1, max=1000, help="Pool slots: the most workers at once.")
    ] = 4,
    brokers: Annotated[int, typer.Option(min=1, max=16, help="Broker replicas.")] = 2,
    registry: Annotated[
        str, typer.Option(help="Prefix of the skyhop images, e.g. ghcr.io/acme/.")
    ] = "",
    version: Annotated[str, typer.Option(help="Tag of the skyhop images.")] = "0.1.0",
) -> None:
    """Write the fleet's Kubernetes manifests and Secrets; then kubectl apply -f DIR.

    DIR/skyhop.yaml: namespace, RBAC, MQTT server, brokers, worker Deployment.
    DIR/secrets.yaml (0600): the pods' certificates and keys, the worker keys.

    Certificates it needs are issued into the home's registry: skyhop-mqtt,
    skyhop-broker-N, pool-1 … pool-MAX_SIZE. Render and apply again after
    `skyhop certs revoke` or `skyhop keys rotate`.
    """
    from skyhop.deploy import kubernetes

    _require_yaml()
    h = Home(home or default_home())
    cluster = kubernetes.Cluster(namespace=namespace, max_size=max_size, brokers=brokers,
                                 models=tuple(m for m in models.split(",") if m),
                                 registry=registry, version=version)
    docs = kubernetes.render(h, cluster, dt.datetime.now(dt.timezone.utc))
    for path in kubernetes.write(out, docs):
        typer.echo(f"wrote {path}")
    typer.echo(f"next: kubectl apply -f {out}   (the pool starts at 0 workers; the "
               f"brokers size it, up to {max_size})")


@app.command()
def unpack(
    secrets: Annotated[
        Path, typer.Option(help="Where the pod mounts its Secret (skyhop-pool, skyhop-broker).")
    ],
    home: Annotated[Path, typer.Option(help="The home to write (an emptyDir).")],
    node: Annotated[
        str | None, typer.Option(help="This pod's node: a broker's is its pod name.")
    ] = None,
    slot_from_pod: Annotated[
        bool, typer.Option(help="Wait for the slot a broker writes on this pod (a pool "
                           "worker; needs POD_NAME and POD_NAMESPACE from the downward API).")
    ] = False,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the slot.")
    ] = 600.0,
) -> None:
    """Write a pod's home from its mounted Secret: the shared files and its own slot."""
    from skyhop.deploy import kubernetes

    if (node is None) == (not slot_from_pod):
        raise ConfigError("give one of --node NAME or --slot-from-pod")
    if node is None:
        node = _slot(timeout)
    written = kubernetes.unpack(secrets, home, node)
    typer.echo(f"node {node}: {len(written)} files in {home}")


def _slot(timeout: float) -> str:
    from cloud_broker.k8s_pool import SLOT, load_config
    from skyhop.deploy.kubernetes import wait_for_slot

    pod, namespace = os.environ.get("POD_NAME"), os.environ.get("POD_NAMESPACE")
    if not pod or not namespace:
        raise ConfigError("--slot-from-pod needs POD_NAME and POD_NAMESPACE (the downward "
                          "API: deploy/kubernetes/40-worker.yaml)")
    try:
        import kubernetes
    except ImportError:
        raise ConfigError("--slot-from-pod needs the Kubernetes client: pip install "
                          "'skyhop[k8s]'") from None
    load_config(kubernetes, None)
    core = kubernetes.client.CoreV1Api()

    def annotations() -> dict[str, str]:
        meta = core.read_namespaced_pod(pod, namespace).metadata
        return dict(meta.annotations or {}) if meta is not None else {}

    typer.echo(f"pod {namespace}/{pod}: waiting for a broker to give it a slot")
    return wait_for_slot(annotations, SLOT, timeout)
