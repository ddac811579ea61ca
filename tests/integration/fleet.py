"""Builders for integration tests: a fleet home with its own topic prefix and catalog.

The catalog holds the real ``digits`` model and ``slow``, a real ONNX model made here
with onnx.helper whose run takes tens of milliseconds on a CPU (a chain of 512×512
matrix products), so that tests can catch a request while it is running; ``busy``
(``add_busy_model``) does the same work for an input and output of a few bytes.
"""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import sys
import tarfile
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from skyhop.errors import RemoteError
from skyhop.home import Home
from skyhop.models import MODELS_DIR, sha256_file
from skyhop.mqtt.bus import Bus
from skyhop.mqtt.url import TlsFiles
from skyhop.protocol.messages import NodeStatus
from skyhop.protocol.topics import Topics

SLOW_SIDE = 512
SLOW_LAYERS = 24


def _weight(rng: np.random.Generator, side: int = SLOW_SIDE) -> np.ndarray:
    return (rng.standard_normal((side, side)) / np.sqrt(side)).astype(np.float32)


def _save(path: Path, name: str, nodes: list, inits: list, x: list, y: list) -> None:
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def build_slow_model(path: Path) -> None:
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(SLOW_LAYERS):
        inits.append(numpy_helper.from_array(_weight(rng), f"w{i}"))
        out = "y" if i == SLOW_LAYERS - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [out]))
        prev = out
    _save(path, "slow", nodes, inits, [SLOW_SIDE, SLOW_SIDE], [SLOW_SIDE, SLOW_SIDE])


BUSY_LAYERS = 48


def build_busy_model(path: Path, side: int = SLOW_SIDE, layers: int = BUSY_LAYERS) -> int:
    """``busy``: tens of milliseconds of compute (on a CPU, at the defaults) with payloads
    of bytes. The [1, 64] input is tiled to side×side, multiplied by one matrix ``layers``
    times, averaged. Returns the weight's size in bytes."""
    weight = _weight(np.random.default_rng(1), side)
    repeats = np.array([side, side // 64], np.int64)
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(repeats, "repeats")]
    nodes = [helper.make_node("Tile", ["x", "repeats"], ["h0"])]
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "w"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("ReduceMean", [f"h{layers}"], ["y"], axes=[0, 1]))
    _save(path, "busy", nodes, inits, [1, 64], [1, 1])
    return weight.nbytes


def _add_entry(home: Home, name: str, x: list[int | str], y: list[int | str],
               budget_ms: float, max_batch: int) -> Path:
    """Append ``name`` (its file already built beside the catalog, one input ``x``, one
    output ``y``) to the catalog of a home made by ``make_home``; the file's path."""
    catalog = Path(home.config().catalog or "")
    path = catalog.parent / f"{name}.onnx"
    entry = f"""
[[models]]
name = "{name}"
version = "1"
sha256 = "{sha256_file(path)}"
source = {{ path = "{path.name}" }}
inputs = [{{ name = "x", dtype = "float32", shape = {json.dumps(x)} }}]
outputs = [{{ name = "y", dtype = "float32", shape = {json.dumps(y)} }}]
budget_ms = {budget_ms}
max_batch = {max_batch}
"""
    catalog.write_text(catalog.read_text() + entry)
    return path


def _catalog_dir(home: Home) -> Path:
    return Path(home.config().catalog or "").parent


def add_busy_model(home: Home, side: int = SLOW_SIDE, layers: int = BUSY_LAYERS) -> None:
    """Add ``busy`` to the catalog of a home made by ``make_home``."""
    build_busy_model(_catalog_dir(home) / "busy.onnx", side, layers)
    _add_entry(home, "busy", [1, 64], [1, 1], budget_ms=1000, max_batch=1)


def add_wide_model(home: Home, side: int = SLOW_SIDE, layers: int = SLOW_LAYERS) -> Path:
    """Add ``wide`` to a test home's catalog: ``slow``'s chain of matrix products on
    rows of ``side``, with a batch dimension, so requests to it batch. Returns its file."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(_weight(rng, side), f"w{i}") for i in range(layers)]
    names = ["x", *(f"h{i}" for i in range(layers - 1)), "y"]
    nodes = [helper.make_node("MatMul", [names[i], f"w{i}"], [names[i + 1]])
             for i in range(layers)]
    _save(_catalog_dir(home) / "wide.onnx", "wide", nodes, inits, ["N", side], ["N", side])
    return _add_entry(home, "wide", ["N", side], ["N", side], budget_ms=10000, max_batch=64)


CATALOG = """\
schema = 1

[[models]]
name = "digits"
version = "1.0.0"
sha256 = "{digits_sha}"
source = {{ path = "digits.onnx" }}
inputs = [{{ name = "image", dtype = "float32", shape = ["N", 64] }}]
outputs = [
    {{ name = "probabilities", dtype = "float32", shape = ["N", 10] }},
    {{ name = "label", dtype = "int64", shape = ["N"] }},
]
budget_ms = 50
max_batch = 256

[[models]]
name = "slow"
version = "1"
sha256 = "{slow_sha}"
source = {{ path = "slow.onnx" }}
inputs = [{{ name = "x", dtype = "float32", shape = [{side}, {side}] }}]
outputs = [{{ name = "y", dtype = "float32", shape = [{side}, {side}] }}]
budget_ms = 2000
max_batch = 1
"""


def make_home(root: Path, **config: str) -> Home:
    """A fleet home under ``root`` with a unique topic prefix and the test catalog."""
    home = Home(root / "home")
    home.init()
    catalog_dir = root / "catalog"
    catalog_dir.mkdir(exist_ok=True)
    shutil.copy(MODELS_DIR / "digits.onnx", catalog_dir / "digits.onnx")
    build_slow_model(catalog_dir / "slow.onnx")
    (catalog_dir / "catalog.toml").write_text(
        CATALOG.format(
            digits_sha=sha256_file(catalog_dir / "digits.onnx"),
            slow_sha=sha256_file(catalog_dir / "slow.onnx"),
            side=SLOW_SIDE,
        )
    )
    prefix = f"test-{uuid.uuid4().hex[:8]}/v1/"
    extra = "".join(f"{k} = {v}\n" for k, v in config.items())
    text = (home.path / "config.toml").read_text()
    text = text.replace(
        'prefix = "skyhop/v1/"',
        f'prefix = "{prefix}"\ncatalog = "{catalog_dir / "catalog.toml"}"\n{extra}',
    )
    (home.path / "config.toml").write_text(text)
    return home


def wait_for_birth(url: str, topics: Topics, node: str, timeout_s: float,
                   proc: subprocess.Popen[bytes] | None = None, *,
                   tls: TlsFiles | None = None) -> NodeStatus:
    """``node``'s retained birth on ``url``; fails after ``timeout_s`` or once ``proc``
    (the agent) has exited. Over mqtts, ``tls`` is an operator's."""
    births: queue.Queue[NodeStatus] = queue.Queue()
    with Bus(url, "operator" if tls else f"birth-{uuid.uuid4().hex[:8]}", tls=tls) as reader:
        reader.subscribe(topics.status(node), lambda m: births.put(NodeStatus.decode(m.payload)))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"agent {node} exited with {proc.returncode} before birth")
            try:
                status = births.get(timeout=0.2)
            except queue.Empty:
                continue
            if status.online:
                return status
    raise AssertionError(f"no birth from {node} within {timeout_s} s")


def base_python() -> str:
    """The interpreter this venv was made from: an install's venv is made from it."""
    return str(Path(sys._base_executable).resolve())  # type: ignore[attr-defined]


def install_bundle(tar: Path | str, prefix: Path | str, python: str | None = None, *,
                   wrap: tuple[str, ...] = ()) -> float:
    """Extract a ``skyhop bundle`` tarball next to itself and run its install.sh into
    ``prefix`` (``--no-systemd``), under ``wrap`` (``("unshare", "-n")``: offline);
    the seconds install.sh took."""
    tar = Path(tar)
    work = tar.parent / f"x-{tar.name.split('.')[0]}"
    shutil.rmtree(work, ignore_errors=True)
    with tarfile.open(tar) as t:
        t.extractall(work, filter="tar")
    (script,) = work.glob("skyhop-*/install.sh")
    started = time.monotonic()
    subprocess.run([*wrap, str(script), "--prefix", str(prefix), "--no-systemd", "--python",
                    python or base_python()], check=True, timeout=600)
    return time.monotonic() - started


def ends(futures: list) -> Counter[str]:
    """How each request ended: "OK" or its error code, counted (30 s each at most)."""
    out: Counter[str] = Counter()
    for f in futures:
        try:
            f.result(timeout=30)
            out["OK"] += 1
        except RemoteError as exc:
            out[str(exc.code)] += 1
    return out
