"""OnnxRunner against real ONNX Runtime on CPU, with models built here by ``onnx.helper``.

This runs wherever onnxruntime and onnx are installed; the CUDA provider is exercised by
tests/gpu/ on an NVIDIA machine with onnxruntime-gpu.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from edge_agent.runner import CPU, CUDA, ModelRunner, OnnxRunner, TensorSpec
from skyhop.errors import ConfigError, ErrorCode, ProtocolError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

pytestmark = pytest.mark.integration

W = np.arange(6, dtype=np.float32).reshape(3, 2) / 10
B = np.array([1.0, -2.0], dtype=np.float32)


def save(path: Path, nodes, inputs, outputs, initializers=()) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime >= 1.14
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def linear(tmp_path) -> Path:
    """y = x @ W + b, x: float32 [batch, 3], y: float32 [batch, 2]."""
    return save(
        tmp_path / "linear.onnx",
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "b")],
    )


@pytest.fixture
def runner(linear) -> OnnxRunner:
    return OnnxRunner.load("linear", linear, providers=["cpu"], intra_op_threads=1, warmup=2)


def test_pool_threads_sleep_between_runs_rather_than_spin(runner):
    options = runner._session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_load_reads_specs_provider_and_warmup(runner, linear):
    assert runner.name == "linear" and runner.path == linear
    assert runner.provider == CPU
    assert isinstance(runner, ModelRunner)
    assert runner.inputs == (TensorSpec("x", "float32", (None, 3)),)
    assert runner.outputs == (TensorSpec("y", "float32", (None, 2)),)
    assert runner.warmup_s > 0
    assert runner.warmup_ms is not None and 0 < runner.warmup_ms <= runner.warmup_s * 1000


def test_run_matches_numpy(runner):
    x = np.random.default_rng(7).standard_normal((5, 3)).astype(np.float32)
    out = runner.run({"x": x})
    assert list(out) == ["y"]
    np.testing.assert_allclose(out["y"], x @ W + B, rtol=1e-6)


def test_concurrent_runs_share_one_session(runner):
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((i + 1, 3)).astype(np.float32) for i in range(16)]
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        for _ in range(20):
            results[i] = runner.run({"x": xs[i]})["y"]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, x in enumerate(xs):
        np.testing.assert_allclose(results[i], x @ W + B, rtol=1e-6)


@pytest.mark.parametrize(
    ("x", "words"),
    [
        (np.ones((2, 3), np.float64), "must be float32, got float64"),
        (np.ones((2, 4), np.float32), "dim 1 must be 3, got 4"),
        (np.ones((3,), np.float32), "must have rank 2"),
    ],
)
def test_bad_inputs_are_bad_request(runner, x, words):
    with pytest.raises(ProtocolError) as info:
        runner.run({"x": x})
    assert info.value.code == ErrorCode.BAD_REQUEST
    assert words in info.value.message


def test_missing_input_is_bad_request(runner):
    with pytest.raises(ProtocolError) as info:
        runner.run({})
    assert info.value.code == ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("content", [b"", b"\x00not a model" * 8])
def test_corrupt_file_is_config_error_naming_the_path(tmp_path, content):
    path = tmp_path / "corrupt.onnx"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=r"corrupt\.onnx"):
        OnnxRunner.load("bad", path)


def test_missing_file_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.onnx does not exist"):
        OnnxRunner.load("bad", tmp_path / "nope.onnx")


def test_bad_load_arguments(linear):
    with pytest.raises(ConfigError, match="intra_op_threads"):
        OnnxRunner.load("linear", linear, intra_op_threads=0)
    with pytest.raises(ConfigError, match="warmup"):
        OnnxRunner.load("linear", linear, warmup=-1)


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="CUDA is available here")
def test_preferring_an_absent_gpu_is_config_error(linear):
    with pytest.raises(ConfigError, match="available"):
        OnnxRunner.load("linear", linear, providers=["cuda"])


def test_string_tensors_are_refused_at_load(tmp_path):
    path = save(
        tmp_path / "strings.onnx",
        [helper.make_node("Identity", ["s"], ["t"])],
        [helper.make_tensor_value_info("s", TensorProto.STRING, [1])],
        [helper.make_tensor_value_info("t", TensorProto.STRING, [1])],
    )
    with pytest.raises(ConfigError, match=r"tensor\(string\)"):
        OnnxRunner.load("strings", path, warmup=0)


@pytest.fixture
def reshaper(tmp_path) -> Path:
    """x: float32 [n, 6] reshaped to a fixed [2, 6]: only n == 2 runs."""
    return save(
        tmp_path / "reshape.onnx",
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])],
        [numpy_helper.from_array(np.array([2, 6], np.int64), "shape")],
    )


def test_warmup_failure_is_config_error_and_warmup_0_skips_it(reshaper):
    with pytest.raises(ConfigError, match="warm-up"):
        OnnxRunner.load("reshape", reshaper)
    runner = OnnxRunner.load("reshape", reshaper, warmup=0)
    assert runner.warmup_s == 0 and runner.warmup_ms is None
    assert runner.run({"x": np.ones((2, 6), np.float32)})["y"].shape == (2, 6)


def test_model_failure_at_run_is_internal(reshaper):
    runner = OnnxRunner.load("reshape", reshaper, warmup=0)
    with pytest.raises(ProtocolError) as info:
        runner.run({"x": np.ones((3, 6), np.float32)})
    assert info.value.code == ErrorCode.INTERNAL
    assert "reshape" in info.value.message


class _Raising:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def run(self, names, feed):
        raise self.exc


def test_ort_errors_at_run_translate(runner):
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument

    spec = runner.inputs
    x = {"x": np.ones((1, 3), np.float32)}
    for exc, code in [
        (InvalidArgument("bad"), ErrorCode.BAD_REQUEST),
        (Fail("x"), ErrorCode.INTERNAL),
    ]:
        stub = OnnxRunner(
            "m", Path("m"), spec, runner.outputs, CPU, 0.0, None, 10, None, _Raising(exc)
        )
        with pytest.raises(ProtocolError) as info:
            stub.run(x)
        assert info.value.code == code
