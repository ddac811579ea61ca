#!/usr/bin/env bash
# skyhop's checks on an NVIDIA GPU machine that has no network (docs/gpu.md).
#
# Run from the repository root, after tools/device_stage.sh's parts have been copied
# into STAGE on that machine. Results go to OUT (at most 8 files):
#     STAGE=/tmp/skyhop-stage OUT=/tmp/out tools/device_check.sh
#
# 1. onnxruntime-gpu replaces the image's CPU onnxruntime in the image's own Python,
#    beside the nvidia-* CUDA 13 / cuDNN 9 packages it needs (as `pip install` would
#    put it); the rest of skyhop's dependencies go to /tmp/site.
# 2. tests/gpu with SKYHOP_REQUIRE_GPU=1: a missing GPU or CUDA provider fails, never skips.
# 3. bench/gpu_runner.py (CUDA against CPU) and bench/e2e_latency.py with the agent on CUDA.
# 4. tests/integration, where every agent now takes ONNX Runtime's default providers.
# STEPS picks among "gpu bench integration" (default: all three).
set -uo pipefail
: "${STAGE:?set STAGE to the folder holding the staged parts}" "${OUT:?set OUT}"
mkdir -p "$OUT"
exec > >(tee "$OUT/device_check.log") 2>&1

step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)"; }

step "machine"
nvidia-smi || { echo "no nvidia-smi: not a GPU machine"; exit 1; }
python3 --version

step "install"
wheel=$(awk '{print $2}' "$STAGE/ort.sha256")
cat "$STAGE"/ort.part* > "/tmp/$(basename "$wheel")"
(cd /tmp && sha256sum -c <(awk -v w="$(basename "$wheel")" '{print $1"  "w}' "$STAGE/ort.sha256")) || exit 1
python3 -m pip uninstall -y -q onnxruntime
python3 -m pip install -q --no-index --no-deps --no-compile "/tmp/$(basename "$wheel")" || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
    "$STAGE"/wheels/*.whl || exit 1
mkdir -p /tmp/mosquitto && tar -xJf "$STAGE/mosquitto.tar.xz" -C /tmp/mosquitto
# Debian's package makes the user Mosquitto drops root to; the carried binary does not.
id mosquitto >/dev/null 2>&1 || useradd --system --no-create-home mosquitto
export PATH=/tmp/mosquitto/bin:$PATH PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export SKYHOP_MODEL_CACHE=$STAGE/models
mosquitto -h | head -1
python3 -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.get_available_providers())'
# The agent preloads CUDA and cuDNN from the nvidia-* packages (edge_agent/runner.py);
# if that does not reach them, say so and put them on the loader's path instead.
cuda_check='from edge_agent.runner import OnnxRunner, CUDA
r = OnnxRunner.load("digits", "skyhop/catalog/digits.onnx", ["cuda"])
raise SystemExit(0 if r.provider == CUDA else f"digits runs on {r.provider}")'
if ! python3 -c "$cuda_check"; then
    site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    LD_LIBRARY_PATH=$(find "$site/nvidia" -type d -name lib | paste -sd:)
    export LD_LIBRARY_PATH
    echo "preloading did not reach CUDA; LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    python3 -c "$cuda_check" || echo "CUDA provider still unusable"
fi

steps=" ${STEPS:-gpu bench integration} "
if [[ $steps == *" gpu "* ]]; then
step "tests/gpu"
SKYHOP_REQUIRE_GPU=1 timeout 300 python3 -m pytest tests/gpu -v -p no:cacheprovider \
    -o log_cli=true --log-cli-level=WARNING --basetemp=/tmp/pt-gpu 2>&1 | tee "$OUT/pytest_gpu.txt"
fi

if [[ $steps == *" bench "* ]]; then
step "bench/gpu_runner.py"
timeout 240 python3 bench/gpu_runner.py --out "$OUT"

step "bench/e2e_latency.py, agent on CUDA"
timeout 120 python3 bench/e2e_latency.py --providers cuda --out /tmp/e2e \
    && cp /tmp/e2e/e2e_latency.json "$OUT/e2e_latency_cuda.json"
fi

if [[ $steps == *" integration "* ]]; then
step "tests/integration, default providers"
timeout "${INTEGRATION_TIMEOUT:-240}" python3 -m pytest tests/integration -q -p no:cacheprovider \
    --basetemp=/tmp/pt-int 2>&1 | tee "$OUT/pytest_integration.txt"
fi

step "logs"
tar -czf "$OUT/logs.tar.gz" --exclude="*.onnx" -C /tmp pt-gpu 2>/dev/null
echo "done"
