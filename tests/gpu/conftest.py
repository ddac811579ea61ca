"""The gate for tests/gpu: an NVIDIA GPU that NVML opens, and onnxruntime-gpu.

Where either is missing every test here is skipped with the reason, which is the case
on the project's CI (no GPU). ``SKYHOP_REQUIRE_GPU=1`` turns the skip into a failure,
so that a run meant for a GPU machine (tools/device_check.sh) cannot pass by skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def gpu_missing() -> str | None:
    """Why these tests cannot run here, or None when they can."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # ImportError, or any NVMLError (no driver, no device)
        return f"NVML cannot open a GPU here ({type(exc).__name__}: {exc})"
    if count == 0:
        return "NVML sees no GPU here"
    try:
        import onnxruntime
    except ImportError:
        return "onnxruntime is not installed"
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return "this onnxruntime has no CUDA provider (pip install 'skyhop[gpu]')"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mine = [item for item in items if HERE in Path(str(item.path)).parents]
    if not mine:
        return
    reason = gpu_missing()
    if reason is not None and os.environ.get("SKYHOP_REQUIRE_GPU") == "1":
        pytest.exit(f"SKYHOP_REQUIRE_GPU=1, but {reason}", returncode=1)
    for item in mine:
        item.add_marker(pytest.mark.gpu)
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))
