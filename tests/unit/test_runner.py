"""edge_agent.runner: provider choice, input validation, FakeRunner (no ORT needed)."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.runner import (
    CPU,
    CUDA,
    TRT,
    FakeRunner,
    ModelRunner,
    TensorSpec,
    choose_providers,
    provider_options,
    validate_inputs,
    zeros_for,
)
from skyhop.errors import ConfigError, ErrorCode, ProtocolError

X = TensorSpec("x", "float32", (None, 3))
MASK = TensorSpec("mask", "int64", (None, 3))
SPECS = (X, MASK)


def good(batch: int = 2) -> dict[str, np.ndarray]:
    return {"x": np.ones((batch, 3), np.float32), "mask": np.zeros((batch, 3), np.int64)}


def bad_request(specs, inputs, **kw) -> str:
    with pytest.raises(ProtocolError) as info:
        validate_inputs(specs, inputs, **kw)
    assert info.value.code == ErrorCode.BAD_REQUEST
    return info.value.message


# ---------------------------------------------------------------- TensorSpec


def test_tensor_spec_normalises_shape_and_checks_dtype():
    assert TensorSpec("x", "float32", [None, 3]).shape == (None, 3)
    assert X.shape_text() == "(?, 3)"
    assert TensorSpec("v", "int64", (4,)).shape_text() == "(4,)"
    for bad in ("float", "f4", "nonsense"):
        with pytest.raises(ConfigError):
            TensorSpec("x", bad, (1,))


# ---------------------------------------------------------------- providers


@pytest.mark.parametrize(
    ("available", "expected"),
    [
        ([CPU, CUDA, TRT], [TRT, CUDA, CPU]),
        (["AzureExecutionProvider", CUDA, CPU], [CUDA, CPU]),
        ([CPU], [CPU]),
        ([TRT, CPU], [TRT, CPU]),
        ([], [CPU]),  # ORT always has CPU even if a stub forgot to list it
    ],
)
def test_choose_providers_ranks_what_is_available(available, expected):
    assert choose_providers(available) == expected


def test_choose_providers_prefer_forces_a_subset_keeping_rank_and_cpu_fallback():
    every = [TRT, CUDA, CPU]
    assert choose_providers(every, [CUDA]) == [CUDA, CPU]
    assert choose_providers(every, ["cuda", "trt"]) == [TRT, CUDA, CPU]
    assert choose_providers(every, ["CPU"]) == [CPU]
    assert choose_providers([CPU], ["cuda", "cpu"]) == [CPU]
    assert choose_providers(every, []) == every  # empty means no preference


def test_choose_providers_prefer_unavailable_names_what_is_available():
    with pytest.raises(ConfigError, match=r"available: \[.AzureExecutionProvider"):
        choose_providers(["AzureExecutionProvider", CPU], [TRT, CUDA])


def test_choose_providers_rejects_unknown_names():
    with pytest.raises(ConfigError, match="unknown execution provider 'rocm'"):
        choose_providers([CPU], ["rocm"])


def test_provider_options_defaults_and_trt_cache(tmp_path):
    opts = dict(provider_options([TRT, CUDA, CPU], device_id=1))
    assert opts[TRT] == {"device_id": 1, "trt_fp16_enable": False}
    assert opts[CUDA]["device_id"] == 1
    assert opts[CUDA]["arena_extend_strategy"] == "kSameAsRequested"
    assert opts[CPU] == {}
    cached = dict(provider_options([TRT], trt_fp16=True, trt_cache_dir=tmp_path))[TRT]
    assert cached["trt_fp16_enable"] is True
    assert cached["trt_engine_cache_enable"] is True
    assert cached["trt_engine_cache_path"] == str(tmp_path)


# ---------------------------------------------------------------- validate_inputs


def test_valid_inputs_pass_including_nan_and_inf():
    validate_inputs(SPECS, good())
    x = np.array([[np.nan, np.inf, -np.inf]], np.float32)
    validate_inputs(SPECS, {"x": x, "mask": np.zeros((1, 3), np.int64)})


def test_missing_and_extra_names():
    assert "missing input(s) ['mask']" in bad_request(SPECS, {"x": good()["x"]})
    msg = bad_request(SPECS, {**good(), "y": np.zeros(1)})
    assert "unexpected input(s) ['y']" in msg
    assert "the model takes ['x', 'mask']" in msg
    both = bad_request(SPECS, {"x": good()["x"], "z": np.zeros(1)})
    assert "missing" in both and "unexpected" in both


def test_not_a_mapping_or_not_an_array():
    assert "must be a map" in bad_request(SPECS, [good()["x"]])
    assert "must be an ndarray, got list" in bad_request(SPECS, {**good(), "x": [[1.0, 2.0, 3.0]]})


@pytest.mark.parametrize(
    "value",
    [
        np.array([[object(), 1, 2]], dtype=object),
        np.array([["a", "b", "c"]]),
        np.array([[b"a", b"b", b"c"]]),
        np.zeros((1, 3), dtype="datetime64[s]"),
    ],
)
def test_non_numeric_arrays(value):
    assert "non-numeric dtype" in bad_request(SPECS, {**good(1), "x": value})


def test_wrong_dtype():
    msg = bad_request(SPECS, {**good(), "x": np.ones((2, 3), np.float64)})
    assert "'x' must be float32, got float64" in msg
    assert "must be int64, got int32" in bad_request(
        SPECS, {**good(), "mask": np.zeros((2, 3), np.int32)}
    )


def test_non_native_byte_order():
    swapped = np.ones((2, 3), dtype=np.dtype("float32").newbyteorder())
    assert "byte order" in bad_request(SPECS, {**good(), "x": swapped})


def test_wrong_rank():
    msg = bad_request(SPECS, {**good(), "x": np.ones((3,), np.float32)})
    assert "rank 2 (?, 3), got rank 1" in msg


def test_fixed_dim_mismatch():
    msg = bad_request(SPECS, {**good(), "x": np.ones((2, 4), np.float32)})
    assert "dim 1 must be 3, got 4" in msg


def test_element_and_batch_limits():
    assert "more than the limit of 11" in bad_request(SPECS, good(2), max_elements=11)
    validate_inputs(SPECS, good(2), max_elements=12)
    assert "batch 5 exceeds the limit of 4" in bad_request(SPECS, good(5), max_batch=4)
    validate_inputs(
        (TensorSpec("v", "float32", (8,)),), {"v": np.zeros(8, np.float32)}, max_batch=4
    )


@given(
    batch=st.integers(0, 16),
    tail=st.integers(1, 5),
    wrong=st.integers(1, 5),
)
def test_dynamic_dims_take_any_size_fixed_dims_only_theirs(batch, tail, wrong):
    spec = TensorSpec("t", "uint8", (None, tail))
    validate_inputs((spec,), {"t": np.zeros((batch, tail), np.uint8)})
    if wrong != tail:
        with pytest.raises(ProtocolError):
            validate_inputs((spec,), {"t": np.zeros((batch, wrong), np.uint8)})


def test_zeros_for_sets_dynamic_dims():
    z = zeros_for((X, TensorSpec("flag", "bool", ())), dynamic=4)
    assert z["x"].shape == (4, 3) and z["x"].dtype == np.float32
    assert z["flag"].shape == () and z["flag"].dtype == np.bool_


# ---------------------------------------------------------------- FakeRunner


def fake(**kw) -> FakeRunner:
    kw.setdefault("sleep", lambda _s: None)
    return FakeRunner("m", SPECS, (TensorSpec("y", "float32", (None, 2)),), **kw)


def test_fake_runner_is_a_model_runner_and_returns_zeros_by_batch():
    r = fake()
    assert isinstance(r, ModelRunner)
    assert r.provider == "fake"
    out = r.run(good(5))
    assert out["y"].shape == (5, 2) and out["y"].dtype == np.float32
    assert not out["y"].any()
    assert r.calls == 1


def test_fake_runner_sleeps_service_time_and_uses_fn():
    slept: list[float] = []
    times = iter([0.5, 0.25])
    r = fake(service_time_s=lambda: next(times), sleep=slept.append, fn=lambda i: {"y": i["x"]})
    assert r.run(good(1))["y"].shape == (1, 3)
    r.run(good(1))
    assert slept == [0.5, 0.25]
    fixed: list[float] = []
    fake(service_time_s=0.1, sleep=fixed.append).run(good())
    assert fixed == [0.1]


def test_fake_runner_fail_next_fails_once():
    r = fake()
    r.fail_next = ProtocolError(ErrorCode.INTERNAL, "boom")
    with pytest.raises(ProtocolError, match="boom"):
        r.run(good())
    assert r.fail_next is None
    r.run(good())
    assert r.calls == 2


def test_fake_runner_validates_before_counting_or_sleeping():
    slept: list[float] = []
    r = fake(service_time_s=1.0, sleep=slept.append)
    with pytest.raises(ProtocolError):
        r.run({"x": np.zeros((1, 3), np.float64)})
    assert r.calls == 0 and slept == []


def test_fake_runner_counts_concurrent_calls():
    r = fake()
    threads = [
        threading.Thread(target=lambda: [r.run(good()) for _ in range(50)]) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert r.calls == 400


# ---------------------------------------------------------------- session opening


class FakeOrt:
    """Stands in for onnxruntime where a GPU provider cannot start (its libraries are
    missing): records each InferenceSession attempt, prints from preload_dlls."""

    class SessionOptions:
        def add_session_config_entry(self, key: str, value: str) -> None:
            pass

    def __init__(self, broken: set[str]) -> None:
        self.broken = broken
        self.attempts: list[list[str]] = []
        self.preloads = 0

    def InferenceSession(self, path, sess_options, providers, enable_fallback):
        assert enable_fallback == 0  # ORT's own fallback would drop our options
        self.attempts.append([name for name, _ in providers])
        if providers[0][0] in self.broken:
            raise RuntimeError(f"{providers[0][0]}: libnvinfer.so.10 not found\ndetails")
        return providers

    def preload_dlls(self) -> None:
        self.preloads += 1
        print("Failed to load libcudnn.so.9: not found")

    def get_available_providers(self) -> list[str]:
        return [TRT, CUDA, CPU]


class FakeSession:
    """An InferenceSession of y = x, float32 [N, 3], on the providers it was given."""

    def __init__(self, providers) -> None:
        self.options = dict(providers)

    def get_inputs(self):
        return [SimpleNamespace(name="x", type="tensor(float)", shape=["N", 3])]

    def get_outputs(self):
        return [SimpleNamespace(name="y", type="tensor(float)", shape=["N", 3])]

    def get_providers(self) -> list[str]:
        return list(self.options)

    def run(self, names, feeds):
        return [feeds["x"]]


def test_a_model_on_tensorrt_gets_its_engine_cache_and_fp16_choice(tmp_path, monkeypatch):
    """TensorRT itself never ran here (docs/gpu.md): this checks what the runner asks of it."""
    pytest.importorskip("onnxruntime")
    from edge_agent import runner as runner_module

    ort = FakeOrt(set())
    ort.InferenceSession = lambda path, sess_options, providers, enable_fallback: FakeSession(
        providers)
    monkeypatch.setattr(runner_module, "import_ort", lambda: ort)
    (tmp_path / "m.onnx").write_bytes(b"not read by the fake")
    cache = tmp_path / "home" / "models" / "tensorrt"
    runner = runner_module.OnnxRunner.load("m", tmp_path / "m.onnx", trt_cache_dir=cache,
                                           trt_fp16=True, warmup=2)
    assert runner.provider == TRT and ort.preloads == 1
    assert cache.is_dir()  # TensorRT writes engines there; it must exist first
    trt = runner._session.options[TRT]
    assert trt["trt_engine_cache_path"] == str(cache) and trt["trt_fp16_enable"] is True
    assert runner.run({"x": np.ones((2, 3), np.float32)})["y"].shape == (2, 3)


def test_a_provider_that_cannot_start_is_dropped_and_the_rest_keep_their_options(caplog):
    pytest.importorskip("onnxruntime")  # its error classes are what _open_session catches
    from edge_agent.runner import _open_session

    ort = FakeOrt({TRT})
    opts = provider_options([TRT, CUDA, CPU])
    with caplog.at_level("WARNING", logger="skyhop.runner"):
        session, opened_on = _open_session(ort, Path("m.onnx"), opts, threads=None)
    assert ort.attempts == [[TRT, CUDA, CPU], [CUDA, CPU]]
    assert opened_on == CUDA
    assert session == opts[1:]  # CUDA still has its arena and cuDNN options
    assert f"m.onnx: {TRT} unusable ({TRT}: libnvinfer.so.10 not found); trying {CUDA}" in (
        caplog.text
    )


def test_a_model_no_provider_can_open_is_a_config_error():
    pytest.importorskip("onnxruntime")
    from edge_agent.runner import _open_session

    ort = FakeOrt({CUDA, CPU})
    with pytest.raises(ConfigError, match=r"cannot load model m.onnx: CPUExecutionProvider"):
        _open_session(ort, Path("m.onnx"), provider_options([CUDA, CPU]), threads=2)
    assert ort.attempts == [[CUDA, CPU], [CPU]]


def test_gpu_libraries_are_preloaded_once_with_what_ort_prints_sent_to_the_log(caplog, capsys):
    from edge_agent.runner import _preload_gpu_libraries

    ort = FakeOrt(set())
    with caplog.at_level("WARNING", logger="skyhop.runner"):
        _preload_gpu_libraries(ort)
        _preload_gpu_libraries(ort)
    assert ort.preloads == 1
    assert capsys.readouterr().out == ""
    assert "onnxruntime.preload_dlls: Failed to load libcudnn.so.9: not found" in caplog.text
