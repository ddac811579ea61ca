"""``skyhop bundle`` and its install.sh, for real: wheels from the package index, an
install with the network gone (``unshare -n``), upgrade, uninstall, the systemd unit.

Bundling needs the package index (pip download, with pip's cache); everything after it
runs offline. Not run here: install.sh as root with systemd (this machine has no running
systemd: ``systemd-analyze verify`` checks the unit instead), and an install on aarch64
(no emulator is set up: the aarch64 wheelhouse is resolved offline for its target).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from skyhop.deploy.wheelhouse import Target, missing, read_wheel
from skyhop.home import Home
from skyhop.security.pki import Pki
from tests.integration.fleet import base_python, install_bundle, make_home

ROOT = Path(__file__).resolve().parents[2]
SKYHOP = [sys.executable, "-m", "skyhop"]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def python310() -> str | None:
    """pyenv's or PATH's python3.10 (JetPack 6's Python), if it runs."""
    root = subprocess.run(["pyenv", "root"], capture_output=True, text=True, check=False)
    candidates = sorted(Path(root.stdout.strip() or "/nonexistent").glob(
        "versions/3.10*/bin/python3.10")) if root.returncode == 0 else []
    for path in [*map(str, candidates), shutil.which("python3.10")]:
        if path and subprocess.run([path, "-c", ""], check=False).returncode == 0:
            return path
    return None


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Home:
    """A fleet home with a CA, the broker's and a client's certificates, and digits+slow."""
    home = make_home(tmp_path_factory.mktemp("fleet"))
    pki = Pki(home.path)
    pki.init()
    for name, role in (("broker", "broker"), ("client", "client"), ("operator", "operator")):
        pki.issue(name, role)
    return home


def bundle(home: Home, node: str, out: Path, *args: str) -> Path:
    proc = subprocess.run([*SKYHOP, "bundle", node, "--home", str(home.path), "--out",
                           str(out), *args], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "wheels" in proc.stdout and "0600" in proc.stdout  # it says what it put in
    return out


def members(path: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return {m.name: m for m in tar.getmembers() if m.isfile()}


def _home_files(tar: Path) -> set[str]:
    names = {n.split("/", 1)[1] for n in members(tar)}
    return {n for n in names if not n.startswith("wheels/")}


# ---------------------------------------------------------------- what a bundle holds


def test_each_role_gets_exactly_its_files(fleet: Home, tmp_path: Path) -> None:
    edge = bundle(fleet, "cam-1", tmp_path / "edge.tar.gz", "--models", "digits",
                  "--mqtt", "mqtts://10.1.2.3:8883")
    client = bundle(fleet, "app-1", tmp_path / "client.tar.gz", "--role", "client",
                    "--mqtt", "mqtts://10.1.2.3:8883")
    (kid,) = [p.name for p in fleet.keys_dir.glob("worker-*.pem")]
    common = {"install.sh", "uninstall.sh", "skyhop-agent.service", "bundle.env",
              "SHA256SUMS", "home/config.toml", "home/catalog.toml", "home/keys/fleet.json",
              "home/pki/ca.crt", "home/pki/crl.pem"}
    assert _home_files(edge) == common | {
        f"home/keys/{kid}", "home/models/digits/digits.onnx",
        "home/pki/cam-1.crt", "home/pki/cam-1.key"}
    assert _home_files(client) == common | {"home/pki/app-1.crt", "home/pki/app-1.key"}

    private = {"home/keys/" + kid, "home/pki/cam-1.key"}
    for name, info in members(edge).items():
        inner = name.split("/", 1)[1]
        want = 0o600 if inner in private else 0o755 if inner.endswith(".sh") else 0o644
        assert stat.S_IMODE(info.mode) == want, name
    # No secret but the node's own: the CA key and other identities' keys stay home.
    for tar, own in ((edge, "cam-1"), (client, "app-1")):
        with tarfile.open(tar) as t:
            blob = b"".join(t.extractfile(m).read() for m in t.getmembers() if m.isfile())
        for secret in [fleet.path / "pki" / "ca.key",
                       *(p for p in (fleet.path / "pki").glob("*.key") if p.stem != own)]:
            assert secret.read_bytes() not in blob, (tar.name, secret.name)
    wheels = {n.rsplit("/", 1)[1].split("-")[0] for n in members(edge) if n.endswith(".whl")}
    assert {"skyhop", "onnxruntime", "numpy", "paho_mqtt", "cryptography"} <= wheels
    client_wheels = {n for n in members(client) if n.endswith(".whl")}
    assert not any("/onnxruntime-" in n for n in client_wheels)  # a client runs no model


# ---------------------------------------------------------------- offline install


@pytest.mark.parametrize("python", ["host", "3.10"])
def test_an_offline_install_serves_the_right_answers(
    fleet: Home, tmp_path: Path, python: str
) -> None:
    """The install runs with the network gone (unshare -n): the bundle is complete. With
    the host's Python, a client bundle's installed ``skyhop infer`` asks as well."""
    if python == "host":
        interpreter, args = base_python(), []
    else:
        found = python310()
        if found is None:
            if os.environ.get("CI"):
                pytest.fail("python3.10 not found: CI proves the JetPack 6 Python")
            pytest.skip("python3.10 not found")
        interpreter, args = found, ["--python", "3.10"]
    node = f"cam-{python.replace('.', '')}"
    tar = bundle(fleet, node, tmp_path / f"{node}.tar.gz", "--models", "digits",
                 "--mqtt", "mqtts://127.0.0.1:1", *args)  # the test's server overrides it
    client = [] if python != "host" else [str(bundle(
        fleet, "app-offline", tmp_path / "client.tar.gz", "--role", "client",
        "--mqtt", "mqtts://127.0.0.1:1"))]
    proc = subprocess.run(
        ["unshare", "-n", sys.executable, "-m", "tests.integration.offline_node",
         str(fleet.path), str(tar), str(tmp_path / "opt"), node, interpreter, *client],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["labels"] == report["expected"]
    assert report["models"] == ["digits"] and report["agent_exit"] == 0
    if client:  # the client bundle's own skyhop infer, as app-offline over mTLS
        assert report["client"].startswith(f"OK digits on {node} (edge)"), report["client"]
    print(f"\n{node}: install {report['install_s']} s offline, birth {report['birth_s']} s")


# ---------------------------------------------------------------- upgrade, uninstall


def test_an_upgrade_keeps_state_and_uninstall_leaves_nothing(
    fleet: Home, tmp_path: Path
) -> None:
    prefix = tmp_path / "opt"
    first = bundle(fleet, "cam-up", tmp_path / "v1.tar.gz", "--models", "digits,slow",
                   "--mqtt", "mqtt://10.0.0.1:1883")
    install_bundle(first, prefix)
    home = prefix / "home"
    assert (home / "models" / "slow" / "slow.onnx").is_file()
    state = [home / "models" / "tensorrt" / "engine.bin", home / "notes.txt"]
    for path in state:
        path.write_text("the node's own")
    python_before = (prefix / "venv" / "bin" / "python").resolve()

    second = bundle(fleet, "cam-up", tmp_path / "v2.tar.gz", "--models", "digits",
                    "--mqtt", "mqtt://10.0.0.2:1883")
    install_bundle(second, prefix)
    assert 'mqtt = "mqtt://10.0.0.2:1883"' in (home / "config.toml").read_text()
    assert not (home / "models" / "slow").exists()  # the old bundle's file, gone
    assert all(p.read_text() == "the node's own" for p in state)
    assert (prefix / "venv" / "bin" / "python").resolve() == python_before
    check = subprocess.run([str(prefix / "bin" / "skyhop"), "check", "--home", str(home),
                            "--json"], capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    assert [m["model"] for m in json.loads(check.stdout)["models"]] == ["digits"]

    (prefix / "mine.txt").write_text("not skyhop's")  # a shared prefix keeps what it had
    subprocess.run([str(prefix / "uninstall.sh")], check=True, timeout=60)
    assert sorted(p.name for p in prefix.iterdir()) == ["mine.txt"]


def test_the_rendered_unit_passes_systemd_analyze_verify(fleet: Home, tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (Debian: apt-get install systemd)")
    prefix = tmp_path / "opt"
    install_bundle(bundle(fleet, "cam-unit", tmp_path / "u.tar.gz", "--models", "digits"),
                   prefix)
    unit = prefix / "skyhop-agent.service"
    text = unit.read_text()
    assert f"ExecStart={prefix}/bin/skyhop agent --home {prefix}/home\n" in text
    assert "@" not in text.replace("multi-user", "")  # every placeholder filled
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


# ---------------------------------------------------------------- aarch64


def test_an_aarch64_bundle_resolves_offline_for_jetpack6(fleet: Home, tmp_path: Path) -> None:
    tar = bundle(fleet, "orin-1", tmp_path / "orin.tar.gz", "--platform", "linux_aarch64",
                 "--python", "3.10", "--models", "digits")
    with tarfile.open(tar) as t:
        t.extractall(tmp_path / "x", filter="tar")
    wheels = tmp_path / "x" / "skyhop-orin-1" / "wheels"
    target = Target.parse("linux_aarch64", "3.10")
    found = [read_wheel(p) for p in wheels.glob("*.whl")]
    needed, closure = missing(found, target, [Requirement("skyhop[cpu]")])
    assert needed == [] and len(closure) == len(found)
    names = {w.name: w.path.name for w in found}
    assert "tomli" in names  # 3.10 only: the marker pip evaluates on the host's Python
    assert "aarch64" in names["onnxruntime"] and "cp310" in names["onnxruntime"]
    proc = subprocess.run(
        ["unshare", "-n", sys.executable, "-m", "pip", "install", "--dry-run", "--no-index",
         "--find-links", str(wheels), *target.pip_args(), "--target", str(tmp_path / "t"),
         "--requirement", str(wheels / "requirements.txt")],
        capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
        | {"PIP_CONFIG_FILE": os.devnull})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Would install" in proc.stdout
