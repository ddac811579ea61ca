"""Model runners: validate a request's tensors, run the model, return named outputs.

The pure core is ``TensorSpec``, ``choose_providers``, ``provider_options`` and
``validate_inputs``; ``OnnxRunner`` is the thin shell around ``onnxruntime`` and
``FakeRunner`` a scripted stand-in for unit tests of the agent::

    runner = OnnxRunner.load("digits", "skyhop/catalog/digits.onnx")
    out = runner.run({"x": batch})          # {"y": ndarray, ...}
    runner.provider                         # e.g. "CUDAExecutionProvider"

Every failure leaves as one of ours: a model that cannot be loaded is a ``ConfigError``
naming the path; a request the model cannot take is ``ProtocolError(BAD_REQUEST)``; a model
that fails while running is ``ProtocolError(INTERNAL)``.

Hardware note: the CUDA path (preloading CUDA and cuDNN, provider options, dropping a
provider that cannot start) ran on an NVIDIA H200 with onnxruntime-gpu 1.31
(tests/gpu/, docs/gpu.md); TensorRT ran only as far as failing to start without its
libraries. Everywhere else the suite checks provider order and options as pure functions
and runs real models on ``CPUExecutionProvider`` (tests/integration/test_onnx_runner.py).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from typing_extensions import Self  # typing.Self is 3.11+

from skyhop.errors import ConfigError, ErrorCode, ProtocolError

log = logging.getLogger("skyhop.runner")

TRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
PROVIDER_RANK = (TRT, CUDA, CPU)  # fastest first; CPU is the fallback ORT always has
_ALIASES = {"tensorrt": TRT, "trt": TRT, "cuda": CUDA, "cpu": CPU}

# 64 Mi elements is 256 MiB of float32 per request: far above any edge model's batch,
# low enough that a hostile or buggy client cannot make the agent allocate gigabytes.
MAX_ELEMENTS = 64 * 2**20

# ORT element types a skyhop request can carry: those numpy represents natively.
# bfloat16, float8, int4 and string have no plain numpy dtype and are refused at load.
ORT_TO_NUMPY = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}


def _bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, message)


@dataclass(frozen=True)
class TensorSpec:
    """One named model input or output. ``None`` in ``shape`` is a dynamic dimension."""

    name: str
    dtype: str  # numpy dtype name, e.g. "float32"
    shape: tuple[int | None, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))
        try:
            canonical = np.dtype(self.dtype).name
        except TypeError:
            canonical = None
        if canonical != self.dtype:
            raise ConfigError(f"tensor {self.name!r}: {self.dtype!r} is not a numpy dtype name")

    def shape_text(self) -> str:
        """The shape with dynamic dims as ``?``, for error messages: ``(?, 3)``."""
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"({dims},)" if len(self.shape) == 1 else f"({dims})"


# ---------------------------------------------------------------- providers (pure)


def choose_providers(available: Sequence[str], prefer: Sequence[str] | None = None) -> list[str]:
    """Order the execution providers to ask ORT for: TensorRT > CUDA > CPU.

    ``available`` is ``onnxruntime.get_available_providers()``. ``prefer`` restricts the
    choice to a subset (full names or the aliases ``tensorrt``/``trt``/``cuda``/``cpu``);
    the result keeps the fixed ranking and always ends with CPU, which ORT needs for nodes
    the GPU providers do not take. Raises ConfigError if nothing preferred is available.
    """
    usable = [p for p in PROVIDER_RANK if p in available and p != CPU]
    if prefer:
        wanted = {_provider_name(p) for p in prefer}
        usable = [p for p in usable if p in wanted]
        if not usable and CPU not in wanted:
            raise ConfigError(
                f"none of the preferred providers {list(prefer)} is available here; "
                f"available: {list(available)}"
            )
    return [*usable, CPU]


def _provider_name(name: str) -> str:
    full = _ALIASES.get(name.lower(), name)
    if full not in PROVIDER_RANK:
        raise ConfigError(f"unknown execution provider {name!r}: use one of {list(PROVIDER_RANK)}")
    return full


def provider_options(
    providers: Sequence[str],
    *,
    device_id: int = 0,
    trt_fp16: bool = False,
    trt_cache_dir: str | Path | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """The ``(name, options)`` pairs to pass as ``InferenceSession(providers=...)``."""
    return [(p, _options(p, device_id, trt_fp16, trt_cache_dir)) for p in providers]


def _options(provider: str, device_id: int, fp16: bool,
             cache: str | Path | None) -> dict[str, Any]:
    if provider == TRT:
        # fp16 is off by default: it changes numerics, which must be an explicit choice.
        opts: dict[str, Any] = {"device_id": device_id, "trt_fp16_enable": fp16}
        if cache is not None:
            # Building an engine takes minutes on a Jetson; the cache makes restarts fast.
            opts |= {
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(cache),
                "trt_timing_cache_enable": True,
                "trt_timing_cache_path": str(cache),
            }
        return opts
    if provider == CUDA:
        return {
            "device_id": device_id,
            # The default arena doubles on growth; on a shared or unified-memory edge GPU
            # that strands memory other processes need.
            "arena_extend_strategy": "kSameAsRequested",
            # EXHAUSTIVE (the default) benchmarks convolutions on every new input shape,
            # so each new batch size would pay a multi-second spike mid-traffic.
            "cudnn_conv_algo_search": "HEURISTIC",
        }
    return {}


# ---------------------------------------------------------------- validation (pure)


def validate_inputs(
    specs: Sequence[TensorSpec],
    inputs: Mapping[str, np.ndarray],
    *,
    max_elements: int = MAX_ELEMENTS,
    max_batch: int | None = None,
) -> None:
    """Raise ``ProtocolError(BAD_REQUEST)`` unless ``inputs`` fit ``specs`` exactly.

    Checks names (none missing, none extra), that each value is a numeric ndarray in native
    byte order with the spec's dtype, rank and fixed dims; ``max_batch`` bounds dim 0 where
    it is dynamic, ``max_elements`` the request's total size. NaN and inf are data, not errors.
    """
    if not isinstance(inputs, Mapping):
        raise _bad(f"inputs must be a map of name to tensor, got {type(inputs).__name__}")
    _check_names(specs, inputs)
    for spec in specs:
        _check_tensor(spec, inputs[spec.name], max_batch)
    total = sum(int(inputs[s.name].size) for s in specs)
    if total > max_elements:
        raise _bad(f"request holds {total} elements, more than the limit of {max_elements}")


def _check_names(specs: Sequence[TensorSpec], inputs: Mapping[str, Any]) -> None:
    expected = [s.name for s in specs]
    missing = [n for n in expected if n not in inputs]
    extra = sorted(str(n) for n in inputs if n not in expected)
    if missing or extra:
        parts = [f"missing input(s) {missing}"] if missing else []
        parts += [f"unexpected input(s) {extra}"] if extra else []
        raise _bad(f"{'; '.join(parts)}; the model takes {expected}")


def _check_tensor(spec: TensorSpec, value: Any, max_batch: int | None) -> None:
    what = f"input {spec.name!r}"
    if not isinstance(value, np.ndarray):
        raise _bad(f"{what} must be an ndarray, got {type(value).__name__}")
    if value.dtype.kind not in "biufc":
        raise _bad(f"{what} has non-numeric dtype {value.dtype}; the model takes {spec.dtype}")
    if value.dtype.name != spec.dtype:
        raise _bad(f"{what} must be {spec.dtype}, got {value.dtype.name}")
    if not value.dtype.isnative:
        # ORT reads the raw buffer: a byte-swapped array would be silently misread.
        raise _bad(f"{what} must be in native (little-endian) byte order")
    _check_shape(spec, value.shape, what)
    dynamic_batch = bool(spec.shape) and spec.shape[0] is None
    if max_batch is not None and dynamic_batch and value.shape[0] > max_batch:
        raise _bad(f"{what} batch {value.shape[0]} exceeds the limit of {max_batch}")


def _check_shape(spec: TensorSpec, shape: tuple[int, ...], what: str) -> None:
    if len(shape) != len(spec.shape):
        raise _bad(
            f"{what} must have rank {len(spec.shape)} {spec.shape_text()}, "
            f"got rank {len(shape)} {shape}"
        )
    for axis, (want, got) in enumerate(zip(spec.shape, shape, strict=True)):
        if want is not None and want != got:
            raise _bad(
                f"{what} dim {axis} must be {want}, got {got} "
                f"(shape {shape}, expected {spec.shape_text()})"
            )


# ---------------------------------------------------------------- runners


@runtime_checkable
class ModelRunner(Protocol):
    """What the agent needs from a model: its specs, its provider, and ``run``."""

    @property
    def name(self) -> str: ...
    @property
    def inputs(self) -> tuple[TensorSpec, ...]: ...
    @property
    def outputs(self) -> tuple[TensorSpec, ...]: ...
    @property
    def provider(self) -> str: ...

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate, run, return outputs by name. Safe to call from several threads."""
        ...


@dataclass(frozen=True, eq=False)
class OnnxRunner:
    """An ONNX model in an ``onnxruntime.InferenceSession``. Build it with ``load``."""

    name: str
    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    provider: str  # the provider ORT actually put first, after any fallback
    warmup_s: float  # wall time of all warm-up runs (includes TensorRT engine builds)
    warmup_ms: float | None  # the last warm-up run alone: a prior for service time
    max_elements: int
    max_batch: int | None
    _session: Any = field(repr=False)

    @classmethod
    def load(
        cls,
        name: str,
        path: str | Path,
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        *,
        warmup: int = 1,
        device_id: int = 0,
        trt_fp16: bool = False,
        trt_cache_dir: str | Path | None = None,
        max_elements: int = MAX_ELEMENTS,
        max_batch: int | None = None,
        example: Mapping[str, np.ndarray] | None = None,
    ) -> Self:
        """Load ``path``, read its specs and warm it up ``warmup`` times on ``example``
        (the catalog's example input), else on zeros with every dynamic dim 1.

        ``providers`` restricts the execution providers (see ``choose_providers``);
        ``intra_op_threads`` caps ORT's CPU threads (None: ORT's default). Raises
        ConfigError naming the path if the file is missing, not a usable model, or
        fails its warm-up run. ``warmup_ms`` is the last warm-up run: with ``warmup >= 2``
        it is past the one-off allocation, so it is a fair first guess of the service time.
        """
        ort = import_ort()
        path = Path(path)
        _check_load_args(path, intra_op_threads, warmup)
        chosen = choose_providers(ort.get_available_providers(), providers)
        if chosen[0] != CPU:
            _preload_gpu_libraries(ort)
        if TRT in chosen and trt_cache_dir is not None:
            Path(trt_cache_dir).mkdir(parents=True, exist_ok=True)
        opts = provider_options(
            chosen, device_id=device_id, trt_fp16=trt_fp16, trt_cache_dir=trt_cache_dir
        )
        session, asked = _open_session(ort, path, opts, intra_op_threads)
        ins = tuple(_spec(a, path) for a in session.get_inputs())
        outs = tuple(_spec(a, path) for a in session.get_outputs())
        actual = session.get_providers()[0]
        if actual != asked:
            log.warning("model %s: asked for %s, ORT runs it on %s", name, asked, actual)
        runs = _warm_up(session, example or zeros_for(ins), warmup, path)
        last_ms = runs[-1] * 1000 if runs else None
        log.info("model %s loaded on %s, warm-up %.3f s", name, actual, sum(runs))
        return cls(
            name, path, ins, outs, actual, sum(runs), last_ms, max_elements, max_batch, session
        )

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate ``inputs``, run the model, return ``{output name: array}``.

        Thread-safe: ORT allows concurrent ``Run`` on one session and this holds no state.
        """
        validate_inputs(
            self.inputs, inputs, max_elements=self.max_elements, max_batch=self.max_batch
        )
        names = [o.name for o in self.outputs]
        try:
            values = self._session.run(names, dict(inputs))
        except _run_errors() as exc:
            raise _run_error(self.name, exc) from exc
        return dict(zip(names, values, strict=True))


def import_ort() -> Any:
    # Imported here so the agent (and FakeRunner tests) import without onnxruntime.
    try:
        import onnxruntime
    except ImportError as exc:
        raise ConfigError(
            "onnxruntime is not installed: pip install 'skyhop[cpu]' or 'skyhop[gpu]'"
        ) from exc
    return onnxruntime


def _check_load_args(path: Path, threads: int | None, warmup: int) -> None:
    if not path.is_file():
        raise ConfigError(f"model file {path} does not exist or is not a file")
    if threads is not None and threads < 1:
        raise ConfigError(f"intra_op_threads must be >= 1 or None, got {threads}")
    if warmup < 0:
        raise ConfigError(f"warmup must be >= 0, got {warmup}")


def _ort_errors() -> tuple[type[BaseException], ...]:
    """ORT's exception classes: they share no base class beyond Exception."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    found = (getattr(state, n) for n in dir(state))
    return tuple(t for t in found if isinstance(t, type) and issubclass(t, Exception))


def _run_errors() -> tuple[type[BaseException], ...]:
    # The Python layer of ORT also raises ValueError/RuntimeError/TypeError of its own.
    return (*_ort_errors(), ValueError, RuntimeError, TypeError)


def _open_session(
    ort: Any, path: Path, providers: list[Any], threads: int | None
) -> tuple[Any, str]:
    """An InferenceSession on the first of ``providers`` that ORT can create, and the
    name of that provider.

    A GPU provider fails to create where its libraries are missing: TensorRT's on a
    machine with only CUDA, say. ORT's own fallback retries once, on CUDA and CPU without
    our options, and prints to stdout; ours drops the provider that failed, keeps the
    options of the rest and logs why.
    """
    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only: we log the provider choice ourselves
    if threads is not None:
        so.intra_op_num_threads = threads
    # ORT's pool threads spin after each run, waiting for the next: a core each, taken
    # from the agent's own MQTT thread and whatever shares the board. On 2 cores that
    # cost the routed path more than the spin saves (docs/performance.md §Where the
    # time goes); a pool thread now sleeps until there is work.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for i, (name, _) in enumerate(providers):
        try:
            session = ort.InferenceSession(
                str(path), sess_options=so, providers=providers[i:], enable_fallback=0
            )
            return session, name
        except _run_errors() as exc:
            if i == len(providers) - 1:
                raise ConfigError(f"cannot load model {path}: {exc}") from exc
            headline = str(exc).strip().split("\n")[0] or type(exc).__name__
            log.warning(
                "model %s: %s unusable (%s); trying %s",
                path.name, name, headline, providers[i + 1][0],
            )
    raise ConfigError(f"cannot load model {path}: no execution provider given")


@functools.cache
def _preload_gpu_libraries(ort: Any) -> None:
    """Load CUDA and cuDNN for onnxruntime-gpu, once per process.

    ORT's CUDA provider library carries no search path for them, so it works only where
    they are on the loader's path (JetPack, a CUDA toolkit) or already loaded.
    ``preload_dlls`` (ORT 1.21 and later) loads them from the nvidia-* pip packages that
    ``pip install 'skyhop[gpu]'`` puts beside ORT, else from the loader's path. What it
    prints about a failure goes to our log instead of stdout.
    """
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            preload()
    except Exception as exc:  # a broken CUDA install must still leave the CPU path
        log.warning("onnxruntime.preload_dlls failed: %s", exc)
    for line in printed.getvalue().splitlines():
        if line.strip():
            log.warning("onnxruntime.preload_dlls: %s", line.strip())


def _spec(arg: Any, path: Path) -> TensorSpec:
    """A TensorSpec from an ORT NodeArg; symbolic or unknown dims become None."""
    dtype = ORT_TO_NUMPY.get(arg.type)
    if dtype is None:
        raise ConfigError(
            f"model {path}: tensor {arg.name!r} has type {arg.type}, which skyhop cannot "
            f"carry (numeric tensors only; export classifiers without ZipMap)"
        )
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in arg.shape or ())
    return TensorSpec(arg.name, dtype, shape)


def zeros_for(specs: Sequence[TensorSpec], dynamic: int = 1) -> dict[str, np.ndarray]:
    """Zero tensors that fit ``specs``, with every dynamic dim set to ``dynamic``."""
    return {
        s.name: np.zeros(tuple(dynamic if d is None else d for d in s.shape), dtype=s.dtype)
        for s in specs
    }


def _warm_up(
    session: Any, feed: Mapping[str, np.ndarray], times: int, path: Path
) -> tuple[float, ...]:
    """Run ``times`` times on ``feed``; the seconds each run took."""
    # The first Run allocates arenas and, with TensorRT, builds the engine: pay it here,
    # not on the first client's budget.
    durations = []
    for _ in range(times):
        start = time.perf_counter()
        try:
            session.run(None, dict(feed))
        except _run_errors() as exc:
            shapes = {k: list(v.shape) for k, v in feed.items()}
            raise ConfigError(
                f"model {path} fails its warm-up run on inputs of shapes {shapes}: {exc} "
                f"(declare a valid example input for it in the catalog)"
            ) from exc
        durations.append(time.perf_counter() - start)
    return tuple(durations)


def _run_error(model: str, exc: BaseException) -> ProtocolError:
    # ORT's InvalidArgument (and the Python layer's ValueError) blame the input; anything
    # else is the model or the device failing, which the client cannot fix.
    if type(exc).__name__ == "InvalidArgument" or isinstance(exc, ValueError):
        return _bad(f"model {model} rejected the input: {exc}")
    return ProtocolError(ErrorCode.INTERNAL, f"model {model} failed: {type(exc).__name__}: {exc}")


class FakeRunner:
    """A scripted ModelRunner for unit tests of the agent: no ORT, no real model.

    ``run`` validates like the real runner, counts the call, sleeps ``service_time_s``
    (a number, or a callable returning one per call) through the injected ``sleep``,
    then raises ``fail_next`` once if it is set, else returns ``fn(inputs)`` or zeros
    shaped by ``outputs`` (dynamic dim 0 follows the first input's batch, others are 1)::

        r = FakeRunner("m", (TensorSpec("x", "float32", (None, 3)),),
                       (TensorSpec("y", "float32", (None, 2)),), 0.01, sleep=clock.sleep)
        r.fail_next = ProtocolError(ErrorCode.INTERNAL, "boom")
    """

    def __init__(
        self,
        name: str,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        service_time_s: float | Callable[[], float] = 0.0,
        sleep: Callable[[float], object] = time.sleep,
        fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
        provider: str = "fake",
    ) -> None:
        self.name = name
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.provider = provider
        self.fail_next: BaseException | None = None
        self._service_time = service_time_s
        self._sleep = sleep
        self._fn = fn
        self._lock = threading.Lock()
        self._calls = 0

    @property
    def calls(self) -> int:
        """Runs that passed validation (failed ones included)."""
        with self._lock:
            return self._calls

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        validate_inputs(self.inputs, inputs)
        with self._lock:
            self._calls += 1
            failure, self.fail_next = self.fail_next, None
        st = self._service_time
        self._sleep(st() if callable(st) else st)
        if failure is not None:
            raise failure
        return self._fn(inputs) if self._fn else self._zeros(inputs)

    def _zeros(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        first = inputs[self.inputs[0].name] if self.inputs else None
        batch = first.shape[0] if first is not None and first.ndim else 1
        return {o.name: np.zeros(_fake_shape(o.shape, batch), dtype=o.dtype) for o in self.outputs}


def _fake_shape(shape: tuple[int | None, ...], batch: int) -> tuple[int, ...]:
    return tuple(d if d is not None else (batch if i == 0 else 1) for i, d in enumerate(shape))
