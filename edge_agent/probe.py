"""Telemetry probes: how busy the node's accelerator is, and how much memory it has left.

The agent builds one probe at start and samples it for every load report::

    probe = choose_probe()                  # NVML, else Jetson, else CPU; logs why
    s = probe.sample()                      # ProbeSample(kind, device, util, mem_used_mb, ...)
    probe.close()

``util`` is 0..1 and memory is in MiB. The parsers (``gpu_class``, ``jetson_class``,
``parse_tegrastats``, ``parse_proc_stat``, ``cpu_util``, ``parse_meminfo``) are pure; the
probe classes only read files and call libraries. Every file is read below ``root`` so
tests can build a fake sysfs/procfs tree.

A probe that cannot start raises ``ConfigError`` (``choose_probe`` then tries the next);
one that fails mid-life raises ``ProbeError``, after which the agent should keep going.

Hardware note: ``NvmlProbe`` ran on an NVIDIA H200 (tests/gpu/, docs/gpu.md); on the
CPU-only CI it runs against a stand-in ``pynvml`` module. No Jetson was at hand:
``JetsonProbe`` is tested against fake sysfs trees (Orin, Xavier, Nano layouts),
``TegrastatsProbe`` against a script that prints tegrastats lines. ``CpuProbe`` reads
the real /proc.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

from skyhop.errors import ConfigError, SkyhopError

log = logging.getLogger("skyhop.probe")

KINDS = ("nvml", "jetson", "cpu")
MIB = 2**20


class ProbeError(SkyhopError):
    """A probe that worked could not read its source this time. Retryable."""


@dataclass(frozen=True)
class ProbeSample:
    kind: str  # "nvml" | "jetson" | "cpu"
    device: str  # device class, e.g. "nvidia-h100", "jetson-orin-nx", "cpu"
    util: float  # 0..1
    mem_used_mb: float
    mem_total_mb: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.util <= 1.0:
            raise ProbeError(f"{self.kind} probe: util {self.util} is outside 0..1")
        if not 0.0 <= self.mem_used_mb <= self.mem_total_mb:
            raise ProbeError(
                f"{self.kind} probe: memory {self.mem_used_mb}/{self.mem_total_mb} MiB "
                "is not 0 <= used <= total"
            )


@runtime_checkable
class Probe(Protocol):
    @property
    def kind(self) -> str: ...
    @property
    def device(self) -> str: ...

    def sample(self) -> ProbeSample:
        """Read the current numbers; raises ProbeError if the source fails."""
        ...

    def close(self) -> None:
        """Release the library or subprocess; safe to call twice."""
        ...


def _clamp01(x: float) -> float:
    return min(1.0, max(0.0, x))


def _read(root: Path, rel: str) -> str:
    return (root / rel).read_text(errors="replace")


# ---------------------------------------------------------------- pure parsers


_GPU_NOISE = re.compile(r"^(nvidia|tesla|geforce|gpu|pcie|sxm\d*|nvl|hbm\d*e?|\d+gb|\(tm\)|\(r\))$")


def gpu_class(name: str) -> str:
    """A stable device class from an NVML name: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100"``.

    Memory size, form factor and brand words are dropped so one class covers a product.
    """
    tokens = re.split(r"[\s_\-/]+", name.lower())
    kept = [t for t in tokens if t and not _GPU_NOISE.match(t)]
    cleaned = [re.sub(r"[^a-z0-9.]", "", t) for t in kept]
    return "-".join(["nvidia", *(t for t in cleaned if t)])


_JETSON_STOP = {"developer", "engineering", "reference", "kit", "devkit", "module", "board"}
_TEGRA_SOC = {  # from device-tree "compatible", when the model string lacks "Jetson"
    "tegra264": "jetson-thor",
    "tegra234": "jetson-orin",
    "tegra194": "jetson-xavier",
    "tegra186": "jetson-tx2",
    "tegra210": "jetson-nano",
}


def jetson_class(model: str, compatible: str = "") -> str | None:
    """The device class of a Jetson, or None if neither string says Jetson/Tegra.

    ``"NVIDIA Jetson Orin NX Engineering Reference Developer Kit"`` -> ``"jetson-orin-nx"``;
    ``model`` is /proc/device-tree/model, ``compatible`` /proc/device-tree/compatible.
    """
    tokens = re.split(r"[\s_\-]+", model.strip("\x00 \n").lower())
    if "jetson" in tokens:
        rest = tokens[tokens.index("jetson") + 1 :]
        words = []
        for t in rest:
            if t in _JETSON_STOP:
                break
            words.append(re.sub(r"[^a-z0-9]", "", t))
        return "-".join(["jetson", *(w for w in words if w)])
    for soc, cls in _TEGRA_SOC.items():
        if f"nvidia,{soc}" in compatible:
            return cls
    return None


_RAM_RE = re.compile(r"\bRAM (\d+)/(\d+)([kMG])B")
_GR3D_RE = re.compile(r"\bGR3D(?:_FREQ)? (\d+)%")
_UNIT_MIB = {"k": 1 / 1024, "M": 1.0, "G": 1024.0}


def parse_tegrastats(line: str, device: str = "jetson") -> ProbeSample:
    """One tegrastats line -> ProbeSample; raises ProbeError if RAM or GR3D is absent.

    Handles the old ``GR3D_FREQ 0%@76`` and newer ``GR3D_FREQ 45%@[305,305]`` forms.
    """
    ram = _RAM_RE.search(line)
    gr3d = _GR3D_RE.search(line)
    if ram is None or gr3d is None:
        raise ProbeError(f"not a tegrastats line: {line[:120]!r}")
    scale = _UNIT_MIB[ram.group(3)]
    used, total = int(ram.group(1)) * scale, int(ram.group(2)) * scale
    util = int(gr3d.group(1)) / 100
    return ProbeSample("jetson", device, _clamp01(util), min(used, total), total)


class CpuTimes(NamedTuple):
    idle: int  # jiffies idle + iowait
    total: int  # jiffies of all states, guest time excluded (already in user/nice)


def parse_proc_stat(text: str) -> CpuTimes:
    """The aggregate ``cpu`` line of /proc/stat as (idle, total) jiffies."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            values = [int(v) for v in fields[1:9]]  # user..steal; guest is double counted
            idle = values[3] + (values[4] if len(values) > 4 else 0)
            return CpuTimes(idle, sum(values))
    raise ProbeError("/proc/stat has no aggregate 'cpu' line")


def cpu_util(prev: CpuTimes, cur: CpuTimes, fallback: float = 0.0) -> float:
    """Busy fraction between two /proc/stat readings; ``fallback`` if no time passed."""
    total = cur.total - prev.total
    if total <= 0:
        return fallback
    return _clamp01(1.0 - (cur.idle - prev.idle) / total)


def parse_meminfo(text: str) -> tuple[float, float]:
    """(used, total) MiB from /proc/meminfo: used = MemTotal - MemAvailable."""
    kb: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            kb[key.strip()] = int(parts[0])
    if "MemTotal" not in kb:
        raise ProbeError("/proc/meminfo has no MemTotal")
    # MemAvailable appeared in Linux 3.14; older Jetson kernels (L4T 28) predate it.
    available = kb.get("MemAvailable")
    if available is None:
        available = kb.get("MemFree", 0) + kb.get("Buffers", 0) + kb.get("Cached", 0)
    total = kb["MemTotal"]
    return max(0, total - available) / 1024, total / 1024


# ---------------------------------------------------------------- CPU


def _meminfo(root: Path) -> tuple[float, float]:
    try:
        return parse_meminfo(_read(root, "proc/meminfo"))
    except OSError as exc:
        raise ProbeError(f"cannot read {root / 'proc/meminfo'}: {exc}") from exc


class CpuProbe:
    """CPU busy fraction between samples (from /proc/stat) and RAM in use."""

    kind = "cpu"
    device = "cpu"

    def __init__(self, root: str | Path = "/") -> None:
        self._root = Path(root)
        self._lock = threading.Lock()
        self._last_util = 0.0
        try:
            self._prev = self._times()
            _meminfo(self._root)
        except ProbeError as exc:
            raise ConfigError(f"CPU probe unavailable: {exc}") from exc

    def _times(self) -> CpuTimes:
        try:
            return parse_proc_stat(_read(self._root, "proc/stat"))
        except (OSError, ValueError) as exc:
            raise ProbeError(f"cannot read {self._root / 'proc/stat'}: {exc}") from exc

    def sample(self) -> ProbeSample:
        """Utilisation since the previous sample (or since construction)."""
        with self._lock:
            cur = self._times()
            self._last_util = cpu_util(self._prev, cur, self._last_util)
            self._prev = cur
            util = self._last_util
        used, total = _meminfo(self._root)
        return ProbeSample("cpu", "cpu", util, used, total)

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- NVML


def _import_pynvml() -> Any:
    # Imported lazily: nvidia-ml-py is only in the [gpu] extra.
    try:
        import pynvml
    except ImportError as exc:
        raise ConfigError("pynvml not importable (pip install nvidia-ml-py)") from exc
    return pynvml


def _text(value: str | bytes) -> str:
    # nvidia-ml-py < 11.515 returned bytes for names.
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def nvml_device(cuda_index: int, visible: str | None) -> int | str | None:
    """NVML's name for the GPU that CUDA (and so ONNX Runtime) calls ``cuda_index``.

    CUDA numbers only the GPUs listed in ``CUDA_VISIBLE_DEVICES`` (``visible``), in that
    order; NVML ignores the variable and numbers every GPU. With ``CUDA_VISIBLE_DEVICES=2,3``,
    CUDA's GPU 0 is NVML's index 2. List entries are indices or ``GPU-``/``MIG-`` UUIDs;
    a UUID is returned as is. None: the variable is set but empty, which hides every GPU.
    """
    if cuda_index < 0:
        raise ConfigError(f"GPU index must be 0 or more, got {cuda_index}")
    if visible is None:
        return cuda_index
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if not entries:
        return None
    if cuda_index >= len(entries):
        raise ConfigError(
            f"CUDA_VISIBLE_DEVICES={visible!r} makes {len(entries)} GPU(s) visible; "
            f"there is no GPU {cuda_index}"
        )
    entry = entries[cuda_index]
    if entry.isdigit():
        return int(entry)
    if entry.startswith(("GPU-", "MIG-")):
        return entry
    raise ConfigError(
        f"CUDA_VISIBLE_DEVICES entry {entry!r} is neither a GPU index nor a GPU-/MIG- UUID"
    )


class NvmlProbe:
    """One NVIDIA GPU through NVML: utilization.gpu and device memory.

    ``index`` is NVML's index, or the GPU's UUID (see ``nvml_device``).
    """

    kind = "nvml"

    def __init__(self, index: int | str = 0) -> None:
        self._nvml = nvml = _import_pynvml()
        self._index = index
        self._closed = False
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            raise ConfigError(f"NVML init failed: {exc}") from exc
        try:
            self._handle, self.name = self._open(index)
        except BaseException:
            self.close()
            raise
        self.device = gpu_class(self.name)

    def _open(self, index: int | str) -> tuple[Any, str]:
        nvml = self._nvml
        try:
            if isinstance(index, str):
                handle = nvml.nvmlDeviceGetHandleByUUID(index)
                return handle, _text(nvml.nvmlDeviceGetName(handle))
            count = nvml.nvmlDeviceGetCount()
            if not 0 <= index < count:
                raise ConfigError(f"NVML sees {count} GPU(s); there is no GPU index {index}")
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            return handle, _text(nvml.nvmlDeviceGetName(handle))
        except nvml.NVMLError as exc:
            raise ConfigError(f"NVML cannot open GPU {index}: {exc}") from exc

    def sample(self) -> ProbeSample:
        nvml = self._nvml
        try:
            rates = nvml.nvmlDeviceGetUtilizationRates(self._handle)
            mem = nvml.nvmlDeviceGetMemoryInfo(self._handle)
        except nvml.NVMLError as exc:
            raise ProbeError(f"NVML read failed on GPU {self._index}: {exc}") from exc
        total = mem.total / MIB
        used = min(mem.used / MIB, total)
        return ProbeSample("nvml", self.device, _clamp01(rates.gpu / 100), used, total)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError as exc:
            log.debug("nvmlShutdown failed: %s", exc)


# ---------------------------------------------------------------- Jetson


# Where the nvgpu driver exposes GR3D load (per mille), by L4T generation.
JETSON_LOAD_PATHS = (
    "sys/devices/platform/bus@0/17000000.gpu/load",  # Orin, L4T 36 (JetPack 6)
    "sys/devices/platform/17000000.ga10b/load",  # Orin, L4T 35
    "sys/devices/17000000.ga10b/load",
    "sys/devices/platform/17000000.gv11b/load",  # Xavier
    "sys/devices/17000000.gv11b/load",
    "sys/devices/platform/gpu.0/load",  # TX2
    "sys/devices/gpu.0/load",  # Nano, TX1
    "sys/devices/57000000.gpu/load",
)
_IGPU_NAMES = {"gpu", "ga10b", "gv11b", "gp10b", "gm20b"}


def read_device_tree(root: Path) -> tuple[str, str]:
    """(model, compatible) from /proc/device-tree, '' where absent."""
    out = []
    for rel in ("proc/device-tree/model", "proc/device-tree/compatible"):
        try:
            out.append(_read(root, rel).replace("\x00", " ").strip())
        except OSError:
            out.append("")
    return out[0], out[1]


def find_gpu_load(root: Path) -> Path | None:
    """The Jetson GPU load file under ``root``, or None.

    Tries the known paths, then any devfreq device whose of_node is an nvgpu iGPU,
    which covers carrier boards and L4T releases that moved the node.
    """
    for rel in JETSON_LOAD_PATHS:
        if (root / rel).is_file():
            return root / rel
    for dev in sorted((root / "sys/class/devfreq").glob("*/device")):
        try:
            node = (dev / "of_node/name").read_text(errors="replace").strip("\x00 \n")
        except OSError:
            continue
        if node in _IGPU_NAMES and (dev / "load").is_file():
            return dev / "load"
    return None


def _jetson_device(root: Path) -> str:
    model, compatible = read_device_tree(root)
    device = jetson_class(model, compatible)
    if device is None:
        raise ConfigError(f"not a Jetson (device-tree model {model or 'absent'!r})")
    return device


class JetsonProbe:
    """A Jetson iGPU: load from sysfs (per mille), unified memory from /proc/meminfo."""

    kind = "jetson"

    def __init__(self, root: str | Path = "/") -> None:
        self._root = Path(root)
        self.device = _jetson_device(self._root)
        load = find_gpu_load(self._root)
        if load is None:
            raise ConfigError(f"{self.device}: no GPU load file under {self._root / 'sys'}")
        self._load = load
        try:
            self.sample()
        except ProbeError as exc:
            raise ConfigError(f"{self.device}: {exc}") from exc

    def sample(self) -> ProbeSample:
        try:
            permille = int(self._load.read_text().strip())
        except (OSError, ValueError) as exc:
            raise ProbeError(f"cannot read GPU load {self._load}: {exc}") from exc
        used, total = _meminfo(self._root)
        return ProbeSample("jetson", self.device, _clamp01(permille / 1000), used, total)

    def close(self) -> None:
        pass


class TegrastatsProbe:
    """A Jetson through ``tegrastats --interval N``, for when sysfs load is not readable.

    A reader thread keeps the latest parsed line; ``sample`` returns it, waiting for
    the first one, and raises ProbeError once tegrastats has gone quiet or exited.
    ``command`` replaces the tegrastats invocation (tests pass a script).
    """

    kind = "jetson"

    def __init__(
        self,
        device: str = "jetson",
        interval_ms: int = 1000,
        command: Sequence[str] | None = None,
        which: Callable[[str], str | None] = shutil.which,
    ) -> None:
        self.device = device
        self._interval_s = interval_ms / 1000
        argv = list(command) if command else self._default_command(interval_ms, which)
        self._latest: tuple[float, ProbeSample] | None = None
        self._lock = threading.Lock()
        self._first = threading.Event()
        try:
            self._proc = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1
            )
        except OSError as exc:
            raise ConfigError(f"cannot start {argv[0]}: {exc}") from exc
        self._thread = threading.Thread(target=self._read, name="tegrastats", daemon=True)
        self._thread.start()

    @staticmethod
    def _default_command(interval_ms: int, which: Callable[[str], str | None]) -> list[str]:
        path = which("tegrastats")
        if path is None:
            raise ConfigError("tegrastats is not on PATH")
        return [path, "--interval", str(interval_ms)]

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                sample = parse_tegrastats(line, self.device)
            except ProbeError as exc:
                log.debug("%s", exc)
                continue
            with self._lock:
                self._latest = (time.monotonic(), sample)
            self._first.set()
        # EOF: tegrastats is exiting. Reap it before waking a waiting sample(), which
        # would otherwise find it still running and call it merely quiet.
        self._proc.wait()
        self._first.set()

    def sample(self) -> ProbeSample:
        # Wait long enough for tegrastats' first line; later it is a few intervals stale
        # at most, else the process is stuck and its numbers would lie.
        patience = 3 * self._interval_s + 2.0
        self._first.wait(patience)
        with self._lock:
            latest = self._latest
        rc = self._proc.poll()
        if rc is not None:
            raise ProbeError(f"tegrastats exited with status {rc}")
        if latest is None or time.monotonic() - latest[0] > patience:
            raise ProbeError(f"no tegrastats line in the last {patience:.1f} s")
        return latest[1]

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._thread.join(timeout=2)
        if self._proc.stdout is not None:
            self._proc.stdout.close()


# ---------------------------------------------------------------- choice


def _build_jetson(root: Path, which: Callable[[str], str | None]) -> Probe:
    try:
        return JetsonProbe(root)
    except ConfigError as sysfs_exc:
        device = _jetson_device(root)  # raises "not a Jetson" before trying tegrastats
        if which("tegrastats") is None:
            raise ConfigError(f"{sysfs_exc}; and tegrastats is not on PATH") from sysfs_exc
        log.info("sysfs GPU load unusable (%s); using tegrastats", sysfs_exc)
        return TegrastatsProbe(device, which=which)


def _build(
    kind: str, root: Path, nvml_index: int | str | None, which: Callable[[str], str | None]
) -> Probe:
    if kind == "nvml":
        if nvml_index is None:
            raise ConfigError("no GPU is visible to this agent (CUDA_VISIBLE_DEVICES)")
        return NvmlProbe(nvml_index)
    if kind == "jetson":
        return _build_jetson(root, which)
    return CpuProbe(root)


def choose_probe(
    root: str | Path = "/",
    prefer: str | None = None,
    *,
    nvml_index: int | str | None = 0,
    which: Callable[[str], str | None] = shutil.which,
) -> Probe:
    """The best working probe: NVML, else Jetson (sysfs, else tegrastats), else CPU.

    A candidate must construct and return one sample to be chosen, so e.g. an NVML that
    cannot report utilization falls through. ``prefer`` ("nvml"|"jetson"|"cpu") forces
    one kind and raises ConfigError if it does not work. ``nvml_index`` is the GPU NVML
    reads (``nvml_device``; None: none is visible). Logs the choice to ``skyhop.probe``
    with the reason each better kind was skipped.
    """
    if prefer is not None and prefer not in KINDS:
        raise ConfigError(f"unknown probe {prefer!r}: use one of {list(KINDS)}")
    skipped: list[str] = []
    for kind in (prefer,) if prefer else KINDS:
        try:
            probe = _build(kind, Path(root), nvml_index, which)
        except ConfigError as exc:
            skipped.append(f"{kind}: {exc}")
            continue
        try:
            probe.sample()
        except ProbeError as exc:
            probe.close()
            skipped.append(f"{kind}: first sample failed: {exc}")
            continue
        reasons = f" (skipped {'; '.join(skipped)})" if skipped else ""
        log.info("telemetry probe: %s on %s%s", probe.kind, probe.device, reasons)
        return probe
    raise ConfigError(f"no telemetry probe works: {'; '.join(skipped)}")
