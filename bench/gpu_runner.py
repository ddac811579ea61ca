"""Model latency on ONNX Runtime's CUDA provider against its CPU provider, in one run.

For each model (`digits`, and PP-OCRv4 det, rec and cls where cached or fetchable) and
batch size, the model is loaded twice, on CPU (all cores) and on CUDA, the two outputs
are compared, and `OnnxRunner.run` is timed: input validation and the copies to the GPU
and back are included, since the agent pays them for every batch. The number to read is
the ratio CPU p50 / CUDA p50, not the milliseconds. NVML gives the GPU memory each model
takes once loaded. For each model's largest batch it also measures what an agent's
``--concurrency`` buys on the GPU: throughput with 1, 2, 4 threads sharing one CUDA
session. Without a CUDA provider it times the CPU alone and says so.

Results: OUT/gpu_runner.json and OUT/gpu_runner.md.

    python bench/gpu_runner.py [--runs 200] [--max-seconds 5] [--out bench/results]
        [--models digits,ppocr-det] [--threads 1,2,4] [--model-cache DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.runner import CPU, CUDA, OnnxRunner
from skyhop.errors import ConfigError
from skyhop.models import fetch, load_catalog
from skyhop.stats import percentile

SAMPLES = Path(__file__).parents[1] / "tests" / "vectors" / "digits_samples.npz"
# (batch, per-item shape) per model: PP-OCR pages at 640², text lines at 48×320.
CASES: dict[str, list[tuple[int, tuple[int, ...]]]] = {
    "digits": [(1, (64,)), (64, (64,)), (256, (64,))],
    "ppocr-det": [(1, (3, 640, 640))],
    "ppocr-rec": [(1, (3, 48, 320)), (16, (3, 48, 320))],
    "ppocr-cls": [(1, (3, 48, 192)), (32, (3, 48, 192))],
}


def make_inputs(model: str, batch: int, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    if model == "digits":
        images = np.load(SAMPLES)["images"]
        return {"image": np.resize(images, (batch, *shape)).astype(np.float32)}
    x = np.random.default_rng(batch).standard_normal((batch, *shape)).astype(np.float32)
    return {"x": x}


def time_runs(runner: OnnxRunner, x: dict[str, np.ndarray], args: argparse.Namespace
              ) -> list[float]:
    """Milliseconds per run: ``--runs`` of them, or as many as fit in ``--max-seconds``
    (10 at least), after 3 untimed runs."""
    for _ in range(3):
        runner.run(x)
    times: list[float] = []
    stop = time.perf_counter() + args.max_seconds
    while len(times) < args.runs and (len(times) < 10 or time.perf_counter() < stop):
        t0 = time.perf_counter()
        runner.run(x)
        times.append((time.perf_counter() - t0) * 1000)
    return times


def summary(times: list[float], batch: int) -> dict[str, float]:
    p50 = percentile(times, 50)
    return {"runs": len(times), "p50_ms": round(p50, 3), "p99_ms": round(percentile(times, 99), 3),
            "items_per_s": round(batch * 1000 / p50, 1)}


def throughput(runner: OnnxRunner, x: dict[str, np.ndarray], threads: int, seconds: float
               ) -> dict[str, float]:
    """Items per second, and the p50 of each run, with ``threads`` threads calling
    ``run`` on one session for ``seconds``: an agent running that many requests at once."""
    batch = next(iter(x.values())).shape[0]
    times: list[float] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def loop() -> None:
        mine = []
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            runner.run(x)
            mine.append((time.perf_counter() - t0) * 1000)
        with lock:
            times.extend(mine)

    start = time.perf_counter()
    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    return {"threads": threads, "items_per_s": round(len(times) * batch / elapsed, 1),
            "p50_ms": round(percentile(times, 50), 3)}


def agreement(want: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, float]:
    """Largest and mean absolute difference over the float outputs; 0 where equal."""
    diffs = [np.abs(got[k].astype(np.float64) - want[k]) for k in want if want[k].dtype.kind == "f"]
    exact = all(np.array_equal(got[k], want[k]) for k in want if want[k].dtype.kind != "f")
    return {"max_abs_diff": float(max((d.max() for d in diffs), default=0.0)),
            "mean_abs_diff": float(max((d.mean() for d in diffs), default=0.0)),
            "integer_outputs_equal": exact}


class GpuMemory:
    """NVML's memory in use on GPU 0, or None everywhere when NVML cannot open one."""

    def __init__(self) -> None:
        self.probe: Any = None
        try:
            from edge_agent.probe import NvmlProbe

            self.probe = NvmlProbe()
        except ConfigError:
            pass

    @property
    def name(self) -> str | None:
        return self.probe.name if self.probe else None

    def used_mb(self) -> float | None:
        return self.probe.sample().mem_used_mb if self.probe else None


def bench_model(model: str, path: Path, gpu: bool, mem: GpuMemory, args: argparse.Namespace
                ) -> list[dict[str, Any]]:
    cpu = OnnxRunner.load(model, path, ["cpu"], warmup=2)
    before = mem.used_mb()
    cuda = OnnxRunner.load(model, path, ["cuda"], warmup=3) if gpu else None
    after = mem.used_mb()
    rows = []
    for batch, shape in CASES[model]:
        x = make_inputs(model, batch, shape)
        row: dict[str, Any] = {"model": model, "batch": batch, "shape": [batch, *shape],
                               "cpu": summary(time_runs(cpu, x, args), batch)}
        if cuda is not None:
            row["cuda"] = summary(time_runs(cuda, x, args), batch)
            row["speedup_p50"] = round(row["cpu"]["p50_ms"] / row["cuda"]["p50_ms"], 2)
            row["agreement"] = agreement(cpu.run(x), cuda.run(x))
            row["cuda_provider"] = cuda.provider
            if before is not None and after is not None:
                row["gpu_mem_loaded_mb"] = round(after - before, 1)
            if (batch, shape) == CASES[model][-1]:
                row["cuda_threads"] = [throughput(cuda, x, k, args.max_seconds / 2)
                                       for k in args.threads]
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def _line(row: dict[str, Any]) -> str:
    cuda = row.get("cuda")
    gpu = (f" | {cuda['p50_ms']} | {cuda['p99_ms']} | {row['speedup_p50']}× | "
           f"{row['agreement']['max_abs_diff']:.1e}") if cuda else " | – | – | – | –"
    return (f"| {row['model']} | {row['batch']} | {row['cpu']['p50_ms']} | "
            f"{row['cpu']['p99_ms']}{gpu} |")


def markdown(result: dict[str, Any]) -> str:
    head = [f"# ONNX Runtime: CUDA against CPU ({result['gpu'] or 'no GPU: CPU only'})", "",
            f"onnxruntime {result['onnxruntime']}, {result['cpu_count']} CPU cores, "
            f"{result['machine']}. Each row: the same model and input, timed through "
            "`OnnxRunner.run` (validation and host↔GPU copies included).", "",
            "| model | batch | CPU p50 ms | CPU p99 ms | CUDA p50 ms | CUDA p99 ms | "
            "speed-up (p50) | max abs diff |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows = [_line(r) for r in result["rows"]]
    threads = [r for r in result["rows"] if "cuda_threads" in r]
    shared = ["", "One CUDA session shared by k threads (an agent's `--concurrency k`), "
              "items per second (p50 ms per run):", "",
              "| model | batch | " + " | ".join(f"k = {t['threads']}" for t in
                                               threads[0]["cuda_threads"]) + " |",
              "| --- | --- |" + " --- |" * len(threads[0]["cuda_threads"])] if threads else []
    shared += [f"| {r['model']} | {r['batch']} | " + " | ".join(
        f"{t['items_per_s']:,.0f} ({t['p50_ms']})" for t in r["cuda_threads"]) + " |"
        for r in threads]
    skipped = [f"- `{m}` not measured: {why}" for m, why in result["skipped"].items()]
    return "\n".join([*head, *rows, *shared, "", *skipped, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="timed runs per case, at most")
    parser.add_argument("--max-seconds", type=float, default=5.0, help="time cap per case")
    parser.add_argument("--models", default=",".join(CASES), help="comma-separated")
    parser.add_argument("--threads", default="1,2,4", type=lambda v: [int(k) for k in v.split(",")],
                        help="threads sharing one CUDA session, for each model's largest batch")
    parser.add_argument("--model-cache", type=Path,
                        default=os.environ.get("SKYHOP_MODEL_CACHE") or
                        Path(tempfile.gettempdir()) / "skyhop-models")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    import onnxruntime

    gpu = CUDA in onnxruntime.get_available_providers()
    mem = GpuMemory()
    catalog = load_catalog()
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for model in args.models.split(","):
        try:
            path = fetch(catalog.get(model), args.model_cache)
        except ConfigError as exc:
            skipped[model] = str(exc)
            continue
        rows.extend(bench_model(model, path, gpu, mem, args))
    result = {"onnxruntime": onnxruntime.__version__, "gpu": mem.name,
              "providers": [CUDA, CPU] if gpu else [CPU], "cpu_count": os.cpu_count(),
              "machine": platform.machine(), "rows": rows, "skipped": skipped}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_runner.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "gpu_runner.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
