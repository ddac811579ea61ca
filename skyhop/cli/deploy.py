"""``skyhop bundle``: flash a node from one tarball (skyhop.deploy.bundle has the rules).
``register(app)`` adds it to the CLI."""

from __future__ import annotations

import datetime as dt
import tempfile
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from skyhop import audit
from skyhop.deploy import bundle, wheelhouse
from skyhop.errors import ConfigError
from skyhop.home import Home, default_home
from skyhop.models import model_path

console = Console(stderr=True, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("bundle")(bundle_command)


def bundle_command(
    node: Annotated[str, typer.Argument(help="The node's id (its certificate's name).")],
    out: Annotated[
        Path, typer.Option("--out", metavar="FILE", help="The tarball to write (.tar.gz).")
    ],
    home: Annotated[
        Path | None,
        typer.Option("--home", help="Fleet home. Default: $SKYHOP_HOME, else ~/.skyhop."),
    ] = None,
    platform_: Annotated[
        str | None,
        typer.Option("--platform", help="linux_x86_64 or linux_aarch64. Default: this host's."),
    ] = None,
    python: Annotated[
        str | None,
        typer.Option(help="The device's Python: 3.10 (JetPack 6), 3.11 or 3.12. "
                     "Default: this host's."),
    ] = None,
    models: Annotated[
        str | None,
        typer.Option(help="Models the node serves, comma-separated. Default: the "
                     "catalog's models this home has on disk."),
    ] = None,
    role: Annotated[str, typer.Option(help="edge, cloud or client.")] = "edge",
    mqtt: Annotated[
        str | None, typer.Option(help="MQTT server the node connects to. Default: the "
                                 "home's config.")
    ] = None,
    onnxruntime_wheel: Annotated[
        Path | None,
        typer.Option(metavar="WHEEL", help="An onnxruntime(-gpu) wheel to ship instead of "
                     "PyPI's CPU one: NVIDIA's Jetson wheel for the device's JetPack "
                     "(docs/deploy.md)."),
    ] = None,
    find_links: Annotated[
        list[Path] | None,
        typer.Option("--find-links", metavar="DIR",
                     help="Also take wheels from this folder (repeatable)."),
    ] = None,
    also: Annotated[
        list[str] | None,
        typer.Option("--with", metavar="REQ", help="Also ship this requirement (repeatable), e.g. "
                     "nvidia-ml-py for GPU telemetry beside --onnxruntime-wheel."),
    ] = None,
    glibc: Annotated[
        str | None,
        typer.Option(help="The oldest glibc the device may have. Default: 2.28."),
    ] = None,
) -> None:
    """Write one tarball that installs NODE offline: wheels for its platform and Python,
    its config, certificate, keys and models, install.sh and a systemd unit.

    On the device: tar xzf FILE && sudo ./skyhop-NODE/install.sh
    """
    h = Home(home or default_home())
    host = wheelhouse.Target.host()
    target = wheelhouse.Target.parse(platform_ or host.platform, python or host.python, glibc)
    names = _models(h, models, role)
    spec = bundle.Node(node, role, names, mqtt or h.config().mqtt)
    if "127.0.0.1" in spec.mqtt or "localhost" in spec.mqtt:
        console.print(f"[yellow]note[/yellow] {node} will connect to {spec.mqtt}: "
                      f"pass --mqtt with the server's address as the device sees it")
    now = dt.datetime.now(dt.timezone.utc)
    with console.status(f"collecting {node}'s config, keys and models…"):
        files = bundle.node_files(h, spec, now)
    extras = () if onnxruntime_wheel or role == "client" else ("cpu",)
    with tempfile.TemporaryDirectory(prefix="skyhop-bundle-") as tmp, console.status(
        f"collecting wheels for {target.platform}, Python {target.python}…"
    ):
        wheels = wheelhouse.build(target, Path(tmp) / "wheels", extras=extras,
                                  onnxruntime_wheel=onnxruntime_wheel,
                                  find_links=find_links or (), also=also or ())
        files += bundle.wheel_files(wheels)
    files += bundle.scripts(spec, target, package_version("skyhop"))
    files.append(bundle.sha256sums(files))
    bundle.write(out, f"skyhop-{node}", files)
    audit.record(h.audit_path, audit.local_actor(), "bundle.create",
                 {"node": node, "role": role, "models": ",".join(names), "file": str(out),
                  "platform": target.platform, "python": target.python})
    _summary(out, node, target, files)


def _models(h: Home, models: str | None, role: str) -> tuple[str, ...]:
    catalog = h.catalog()
    if models is not None:
        names = tuple(m for m in models.split(",") if m)
        for name in names:
            catalog.get(name)  # ConfigError listing the known models
        return names
    if role == "client":
        return catalog.names
    names = tuple(e.name for e in catalog.models if model_path(e, h.models_dir).is_file())
    if not names:
        raise ConfigError("no catalog model is on disk: pass --models, or `skyhop models "
                          "fetch NAME` first")
    return names


def _summary(out: Path, node: str, target: wheelhouse.Target,
             files: list[bundle.File]) -> None:
    table = Table("part", "files", "size", title=f"{out} ({_size(out.stat().st_size)})")
    parts: dict[str, list[bundle.File]] = {}
    for f in files:
        parts.setdefault(f.part, []).append(f)
    for part, group in parts.items():
        private = sum(f.mode == bundle.PRIVATE for f in group)
        table.add_row(part + (f" ({private} private, 0600)" if private else ""),
                      str(len(group)), _size(sum(len(f.data) for f in group)))
    Console().print(table)
    typer.echo(f"{node}: {target.platform}, Python {target.python}. On the device: "
               f"tar xzf {out.name} && sudo ./skyhop-{node}/install.sh")


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
