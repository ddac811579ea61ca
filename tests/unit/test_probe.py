"""edge_agent.probe: parsers, probes on fake sysfs trees, a stand-in pynvml, the choice.

No GPU here: NVML runs against a fake module, Jetson against trees built in tmp_path,
tegrastats against a script printing real-looking lines, the CPU probe against /proc.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from edge_agent.probe import (
    CpuProbe,
    CpuTimes,
    JetsonProbe,
    NvmlProbe,
    Probe,
    ProbeError,
    ProbeSample,
    TegrastatsProbe,
    choose_probe,
    cpu_util,
    gpu_class,
    jetson_class,
    nvml_device,
    parse_meminfo,
    parse_proc_stat,
    parse_tegrastats,
)
from skyhop.errors import ConfigError

NANO_LINE = (
    "RAM 1216/3964MB (lfb 400x4MB) SWAP 0/1982MB (cached 0MB) IRAM 0/252kB(lfb 252kB) "
    "CPU [3%@102,1%@102,0%@102,0%@102] EMC_FREQ 0%@1600 GR3D_FREQ 0%@76 APE 25 PLL@24C "
    "CPU@27C PMIC@100C GPU@26C AO@33.5C thermal@26.5C POM_5V_IN 1121/1121 POM_5V_GPU 0/0"
)
TX2_LINE = (
    "RAM 2126/7846MB (lfb 1003x4MB) SWAP 0/3923MB (cached 0MB) CPU [1%@345,off,off,0%@345,"
    "1%@345,0%@345] EMC_FREQ 3%@1866 GR3D_FREQ 12%@114 APE 150 BCPU@37C MCPU@37C GPU@35C"
)
ORIN_NX_LINE = (
    "08-24-2023 10:12:43 RAM 2667/7620MB (lfb 1x4MB) SWAP 0/3810MB (cached 0MB) "
    "CPU [2%@729,0%@729,1%@729,0%@729,off,off,off,off] EMC_FREQ 0%@2133 GR3D_FREQ 45%@[305] "
    "NVENC off NVDEC off NVJPG off VIC off OFA off NVDLA0 off APE 174 cpu@48.5C gpu@47.5C "
    "VDD_IN 4405mW/4405mW VDD_CPU_GPU_CV 481mW/481mW VDD_SOC 1242mW/1242mW"
)
AGX_ORIN_LINE = (
    "RAM 30123/62841MB (lfb 2x4MB) SWAP 0/31421MB (cached 0MB) CPU [10%@2201,8%@2201] "
    "GR3D_FREQ 99%@[1300,1300] EMC_FREQ 12%@3199"
)
MEMINFO = "MemTotal:        7800000 kB\nMemFree:  1000000 kB\nMemAvailable:    5752000 kB\n"
STAT_1 = "cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 100 0 100 800 0 0 0 0 0 0\nintr 1\n"
STAT_2 = "cpu  400 0 100 1400 100 0 0 0 50 0\ncpu0 400 0 100 1400 100 0 0 0 50 0\n"


def write(root: Path, rel: str, text: str | bytes) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def proc_tree(root: Path) -> Path:
    write(root, "proc/stat", STAT_1)
    write(root, "proc/meminfo", MEMINFO)
    return root


def jetson_tree(root: Path, model: str, load_rel: str | None, load: str = "453\n") -> Path:
    proc_tree(root)
    write(root, "proc/device-tree/model", model.encode() + b"\x00")
    write(root, "proc/device-tree/compatible", b"nvidia,p3767-0000\x00nvidia,tegra234\x00")
    if load_rel:
        write(root, load_rel, load)
    return root


@pytest.fixture
def no_nvml(monkeypatch):
    # A None entry in sys.modules makes `import pynvml` raise ImportError.
    monkeypatch.setitem(sys.modules, "pynvml", None)


# ---------------------------------------------------------------- pure parsers


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("NVIDIA H100 80GB HBM3", "nvidia-h100"),
        ("NVIDIA H100 PCIe", "nvidia-h100"),
        ("NVIDIA A100-SXM4-40GB", "nvidia-a100"),
        ("Tesla T4", "nvidia-t4"),
        ("Tesla V100-SXM2-16GB", "nvidia-v100"),
        ("NVIDIA GeForce RTX 4090", "nvidia-rtx-4090"),
        ("NVIDIA L4", "nvidia-l4"),
        ("NVIDIA RTX A6000", "nvidia-rtx-a6000"),
    ],
)
def test_gpu_class(name, cls):
    assert gpu_class(name) == cls


@pytest.mark.parametrize(
    ("model", "cls"),
    [
        ("NVIDIA Jetson Orin NX Engineering Reference Developer Kit", "jetson-orin-nx"),
        ("NVIDIA Jetson AGX Orin Developer Kit", "jetson-agx-orin"),
        ("NVIDIA Jetson Orin Nano Developer Kit Super\x00", "jetson-orin-nano"),
        ("NVIDIA Jetson Nano Developer Kit", "jetson-nano"),
        ("NVIDIA Jetson Xavier NX Developer Kit", "jetson-xavier-nx"),
        ("Jetson-AGX", "jetson-agx"),
    ],
)
def test_jetson_class_from_model(model, cls):
    assert jetson_class(model) == cls


def test_jetson_class_from_compatible_and_not_jetson():
    assert jetson_class("Seeed reComputer J4012", "nvidia,p3767-0000 nvidia,tegra234") == (
        "jetson-orin"
    )
    assert jetson_class("Raspberry Pi 4 Model B", "raspberrypi,4-model-b brcm,bcm2711") is None


@pytest.mark.parametrize(
    ("line", "util", "used", "total"),
    [
        (NANO_LINE, 0.0, 1216, 3964),
        (TX2_LINE, 0.12, 2126, 7846),
        (ORIN_NX_LINE, 0.45, 2667, 7620),
        (AGX_ORIN_LINE, 0.99, 30123, 62841),
        ("RAM 2048/4096kB (lfb 1x4MB) GR3D_FREQ 7%@76", 0.07, 2.0, 4.0),
        ("RAM 3/8GB (lfb 1x4MB) GR3D 100%@1300", 1.0, 3072, 8192),
    ],
)
def test_parse_tegrastats(line, util, used, total):
    s = parse_tegrastats(line, "jetson-orin-nx")
    assert (s.kind, s.device) == ("jetson", "jetson-orin-nx")
    assert s.util == pytest.approx(util)
    assert (s.mem_used_mb, s.mem_total_mb) == (pytest.approx(used), pytest.approx(total))


@pytest.mark.parametrize("line", ["", "tegrastats: permission denied", "RAM 1/2MB only"])
def test_parse_tegrastats_rejects_other_lines(line):
    with pytest.raises(ProbeError):
        parse_tegrastats(line)


def test_parse_proc_stat_and_cpu_util():
    a, b = parse_proc_stat(STAT_1), parse_proc_stat(STAT_2)
    assert a == CpuTimes(idle=800, total=1000)
    assert b == CpuTimes(idle=1500, total=2000)  # guest (50) is inside user already
    assert cpu_util(a, b) == pytest.approx(0.3)
    assert cpu_util(a, a, fallback=0.7) == 0.7
    with pytest.raises(ProbeError):
        parse_proc_stat("intr 1\n")


def test_parse_meminfo_with_and_without_memavailable():
    assert parse_meminfo(MEMINFO) == pytest.approx((2048000 / 1024, 7800000 / 1024))
    old = "MemTotal: 4000 kB\nMemFree: 1000 kB\nBuffers: 500 kB\nCached: 500 kB\n"
    assert parse_meminfo(old) == pytest.approx((2000 / 1024, 4000 / 1024))
    with pytest.raises(ProbeError):
        parse_meminfo("MemFree: 1 kB\n")


def test_probe_sample_refuses_impossible_numbers():
    with pytest.raises(ProbeError):
        ProbeSample("cpu", "cpu", 1.5, 1, 2)
    with pytest.raises(ProbeError):
        ProbeSample("cpu", "cpu", 0.5, 3, 2)


# ---------------------------------------------------------------- CPU


def test_cpu_probe_on_real_proc_is_sane():
    probe = CpuProbe()
    deadline = time.monotonic() + 0.05
    while time.monotonic() < deadline:  # a little work so the delta is not empty
        sum(range(1000))
    s = probe.sample()
    assert isinstance(probe, Probe)
    assert (s.kind, s.device) == ("cpu", "cpu")
    assert 0.0 <= s.util <= 1.0
    assert 0 < s.mem_used_mb <= s.mem_total_mb
    assert s.mem_total_mb > 64  # any machine running this has more than 64 MiB
    probe.close()


def test_cpu_probe_uses_deltas_between_samples(tmp_path):
    probe = CpuProbe(proc_tree(tmp_path))
    write(tmp_path, "proc/stat", STAT_2)
    s = probe.sample()
    assert s.util == pytest.approx(0.3)
    assert s.mem_total_mb == pytest.approx(7800000 / 1024)
    assert probe.sample().util == pytest.approx(0.3)  # no time passed: keep the last value


def test_cpu_probe_without_proc_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="CPU probe unavailable"):
        CpuProbe(tmp_path)


# ---------------------------------------------------------------- Jetson


@pytest.mark.parametrize(
    ("model", "load_rel", "device"),
    [
        (
            "NVIDIA Jetson Orin NX Engineering Reference Developer Kit",
            "sys/devices/platform/bus@0/17000000.gpu/load",
            "jetson-orin-nx",
        ),
        (
            "NVIDIA Jetson AGX Orin Developer Kit",
            "sys/devices/17000000.ga10b/load",
            "jetson-agx-orin",
        ),
        (
            "NVIDIA Jetson Xavier NX Developer Kit",
            "sys/devices/17000000.gv11b/load",
            "jetson-xavier-nx",
        ),
        ("NVIDIA Jetson Nano Developer Kit", "sys/devices/gpu.0/load", "jetson-nano"),
    ],
)
def test_jetson_probe_layouts(tmp_path, model, load_rel, device):
    probe = JetsonProbe(jetson_tree(tmp_path, model, load_rel))
    s = probe.sample()
    assert isinstance(probe, Probe)
    assert (s.kind, s.device) == ("jetson", device)
    assert s.util == pytest.approx(0.453)
    assert s.mem_used_mb == pytest.approx(2048000 / 1024)
    write(tmp_path, load_rel, "1000\n")
    assert probe.sample().util == 1.0


def test_jetson_probe_finds_load_through_devfreq(tmp_path):
    root = jetson_tree(tmp_path, "NVIDIA Jetson Orin Nano Developer Kit", None, "")
    dev = root / "sys/devices/platform/somewhere/17000000.gpu"
    write(dev, "load", "250\n")
    write(dev, "of_node/name", b"ga10b\x00")
    (root / "sys/class/devfreq/17000000.gpu").mkdir(parents=True)
    (root / "sys/class/devfreq/17000000.gpu/device").symlink_to(dev)
    assert JetsonProbe(root).sample().util == pytest.approx(0.25)


def test_jetson_probe_refuses_non_jetson_and_missing_load(tmp_path):
    with pytest.raises(ConfigError, match="not a Jetson"):
        JetsonProbe(proc_tree(tmp_path))
    root = jetson_tree(tmp_path, "NVIDIA Jetson Nano Developer Kit", None)
    with pytest.raises(ConfigError, match="no GPU load file"):
        JetsonProbe(root)


def test_jetson_probe_sample_errors_are_probe_errors(tmp_path):
    root = jetson_tree(tmp_path, "NVIDIA Jetson Nano Developer Kit", "sys/devices/gpu.0/load")
    probe = JetsonProbe(root)
    write(root, "sys/devices/gpu.0/load", "garbage")
    with pytest.raises(ProbeError):
        probe.sample()


# ---------------------------------------------------------------- tegrastats


def fake_tegrastats(tmp_path: Path, lines: list[str], then_exit: int | None = None) -> Path:
    """An executable that prints ``lines`` (cycling) like tegrastats, or exits."""
    body = f"""import sys, time
lines = {lines!r}
if {then_exit!r} is not None:
    sys.exit({then_exit!r})
i = 0
while True:
    print(lines[i % len(lines)], flush=True)
    i += 1
    time.sleep(0.05)
"""
    path = tmp_path / "bin" / "tegrastats"
    write(tmp_path, "bin/tegrastats", f"#!{sys.executable}\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_tegrastats_probe_reads_the_latest_line(tmp_path):
    exe = fake_tegrastats(tmp_path, ["noise", ORIN_NX_LINE])
    probe = TegrastatsProbe("jetson-orin-nx", interval_ms=50, command=[str(exe)])
    try:
        s = probe.sample()
        assert (s.device, s.util, s.mem_total_mb) == ("jetson-orin-nx", 0.45, 7620)
    finally:
        probe.close()
    probe.close()  # twice is fine


def test_tegrastats_probe_reports_exit_and_absence(tmp_path):
    exe = fake_tegrastats(tmp_path, [ORIN_NX_LINE], then_exit=3)
    probe = TegrastatsProbe(interval_ms=50, command=[str(exe)])
    try:
        with pytest.raises(ProbeError, match="exited with status 3"):
            probe.sample()
    finally:
        probe.close()
    with pytest.raises(ConfigError, match="not on PATH"):
        TegrastatsProbe(which=lambda _name: None)


# ---------------------------------------------------------------- NVML (stand-in module)


class FakeNvml(types.ModuleType):
    """Just enough of pynvml: one H100, or the failure a test asks for."""

    class NVMLError(Exception):
        pass

    def __init__(self, count=1, fail_init=False, fail_util=False):
        super().__init__("pynvml")
        self.count, self.fail_init, self.fail_util = count, fail_init, fail_util
        self.inits = self.shutdowns = 0

    def nvmlInit(self):
        if self.fail_init:
            raise self.NVMLError("Driver Not Loaded")
        self.inits += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return self.count

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("handle", index)

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if not uuid.startswith("GPU-h100"):
            raise self.NVMLError("Not Found")
        return ("handle", uuid)

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA H100 80GB HBM3"  # old nvidia-ml-py returned bytes

    def nvmlDeviceGetUtilizationRates(self, handle):
        if self.fail_util:
            raise self.NVMLError("Not Supported")
        return types.SimpleNamespace(gpu=37, memory=12)

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(total=80 * 2**30, used=2**30, free=79 * 2**30)


def use_nvml(monkeypatch, **kw) -> FakeNvml:
    fake = FakeNvml(**kw)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    return fake


def test_nvml_probe_samples_and_closes_once(monkeypatch):
    nvml = use_nvml(monkeypatch)
    probe = NvmlProbe(0)
    s = probe.sample()
    assert isinstance(probe, Probe)
    assert (s.kind, s.device, s.util) == ("nvml", "nvidia-h100", 0.37)
    assert (s.mem_used_mb, s.mem_total_mb) == (1024, 80 * 1024)
    probe.close()
    probe.close()
    assert nvml.shutdowns == 1


def test_nvml_errors_translate(monkeypatch, no_nvml):
    with pytest.raises(ConfigError, match="pynvml not importable"):
        NvmlProbe()
    use_nvml(monkeypatch, fail_init=True)
    with pytest.raises(ConfigError, match="NVML init failed: Driver Not Loaded"):
        NvmlProbe()
    nvml = use_nvml(monkeypatch, count=0)
    with pytest.raises(ConfigError, match="no GPU index 0"):
        NvmlProbe()
    assert nvml.shutdowns == 1  # init succeeded, so it was shut down again
    use_nvml(monkeypatch, fail_util=True)
    probe = NvmlProbe()
    with pytest.raises(ProbeError, match="Not Supported"):
        probe.sample()


@pytest.mark.parametrize(("cuda_index", "visible", "nvml"), [
    (0, None, 0),
    (3, None, 3),
    (0, "2,3", 2),  # CUDA renumbers the visible GPUs; NVML does not
    (1, " 2, 3 ", 3),
    (0, "GPU-8f4e2b6c-1d2e-4f5a-9b8c-7d6e5f4a3b2c", "GPU-8f4e2b6c-1d2e-4f5a-9b8c-7d6e5f4a3b2c"),
    (0, "MIG-0d7e4bd7-3b0a-5e2c-8f1d-6a9c2b4e7f10", "MIG-0d7e4bd7-3b0a-5e2c-8f1d-6a9c2b4e7f10"),
    (0, "", None),  # set but empty: every GPU hidden
])
def test_nvml_device_follows_cuda_visible_devices(cuda_index, visible, nvml):
    assert nvml_device(cuda_index, visible) == nvml


def test_nvml_device_refuses_what_it_cannot_map():
    with pytest.raises(ConfigError, match=r"makes 2 GPU\(s\) visible; there is no GPU 2"):
        nvml_device(2, "0,1")
    with pytest.raises(ConfigError, match="neither a GPU index nor"):
        nvml_device(0, "GPU")
    with pytest.raises(ConfigError, match="0 or more"):
        nvml_device(-1, None)


def test_nvml_probe_opens_a_gpu_by_uuid(monkeypatch):
    use_nvml(monkeypatch)
    probe = NvmlProbe("GPU-h100-0")
    assert probe.device == "nvidia-h100" and probe.sample().util == 0.37
    probe.close()
    with pytest.raises(ConfigError, match="cannot open GPU GPU-other: Not Found"):
        NvmlProbe("GPU-other")


def test_choose_probe_with_no_visible_gpu_says_so_and_falls_back(tmp_path, monkeypatch, caplog):
    use_nvml(monkeypatch)
    with caplog.at_level("INFO", logger="skyhop.probe"):
        assert choose_probe(proc_tree(tmp_path), nvml_index=None).kind == "cpu"
    assert "nvml: no GPU is visible to this agent (CUDA_VISIBLE_DEVICES)" in caplog.text


def test_importing_the_module_does_not_import_pynvml():
    code = "import sys, edge_agent.probe; sys.exit('pynvml' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ---------------------------------------------------------------- choose_probe


def test_choose_probe_falls_back_to_cpu_here(no_nvml, caplog):
    model = Path("/proc/device-tree/model")
    if model.exists() and "jetson" in model.read_bytes().decode(errors="replace").lower():
        pytest.skip("this machine is a Jetson")
    with caplog.at_level(logging.INFO, logger="skyhop.probe"):
        probe = choose_probe()
    assert (probe.kind, probe.device) == ("cpu", "cpu")
    assert "nvml: pynvml not importable" in caplog.text
    assert "jetson: not a Jetson" in caplog.text
    probe.close()


def test_choose_probe_picks_jetson_on_a_jetson_tree(tmp_path, no_nvml, caplog):
    root = jetson_tree(
        tmp_path,
        "NVIDIA Jetson Orin NX Engineering Reference Developer Kit",
        "sys/devices/platform/17000000.ga10b/load",
    )
    with caplog.at_level(logging.INFO, logger="skyhop.probe"):
        probe = choose_probe(root)
    assert isinstance(probe, JetsonProbe)
    assert probe.device == "jetson-orin-nx"
    assert "telemetry probe: jetson on jetson-orin-nx" in caplog.text


def test_choose_probe_uses_tegrastats_when_sysfs_load_is_absent(tmp_path, no_nvml):
    root = jetson_tree(tmp_path, "NVIDIA Jetson Nano Developer Kit", None)
    exe = fake_tegrastats(tmp_path, [NANO_LINE])
    probe = choose_probe(root, which=lambda name: str(exe) if name == "tegrastats" else None)
    try:
        assert isinstance(probe, TegrastatsProbe)
        assert probe.sample().device == "jetson-nano"
    finally:
        probe.close()


def test_choose_probe_jetson_without_load_or_tegrastats_falls_to_cpu(tmp_path, no_nvml):
    root = jetson_tree(tmp_path, "NVIDIA Jetson Nano Developer Kit", None)
    probe = choose_probe(root, which=lambda _name: None)
    assert probe.kind == "cpu"


def test_choose_probe_prefers_nvml_and_skips_one_without_utilization(tmp_path, monkeypatch):
    use_nvml(monkeypatch)
    assert choose_probe(proc_tree(tmp_path)).kind == "nvml"
    nvml = use_nvml(monkeypatch, fail_util=True)
    probe = choose_probe(tmp_path)
    assert probe.kind == "cpu"
    assert nvml.shutdowns == 1  # the NVML candidate was closed, not leaked


def test_choose_probe_prefer(tmp_path, no_nvml):
    root = proc_tree(tmp_path)
    assert choose_probe(root, prefer="cpu").kind == "cpu"
    with pytest.raises(ConfigError, match="unknown probe"):
        choose_probe(root, prefer="rocm")
    with pytest.raises(ConfigError, match="no telemetry probe works: jetson: not a Jetson"):
        choose_probe(root, prefer="jetson")
    with pytest.raises(ConfigError, match="nvml"):
        choose_probe(root, prefer="nvml")


def test_all_file_reads_go_through_root(tmp_path, no_nvml):
    # An empty root must not silently read the host's /proc.
    with pytest.raises(ConfigError, match="no telemetry probe works"):
        choose_probe(tmp_path)
    assert not os.listdir(tmp_path)


# ---------------------------------------------------------------- the agent's GPU


def test_the_agent_reports_the_gpu_its_models_run_on(monkeypatch, caplog):
    from edge_agent.builder import agent_probe

    use_nvml(monkeypatch, count=4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert agent_probe(None)._handle == ("handle", 2)  # CUDA's GPU 0 is NVML's 2
    assert agent_probe(1)._handle == ("handle", 3)
    with pytest.raises(ConfigError, match="there is no GPU 2"):
        agent_probe(2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ConfigError, match="--gpu 0, but CUDA_VISIBLE_DEVICES is empty"):
        agent_probe(0)
    assert agent_probe(None).kind == "cpu"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "all")
    with caplog.at_level("WARNING", logger="skyhop.agent"):
        assert agent_probe(None).kind == "cpu"
    assert "'all' is neither a GPU index nor a GPU-/MIG- UUID; no GPU telemetry" in caplog.text
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with pytest.raises(ConfigError, match="no GPU index 4"):
        agent_probe(4)  # an explicit GPU must be one: no fallback to the CPU's numbers
