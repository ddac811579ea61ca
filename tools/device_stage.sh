#!/usr/bin/env bash
# Stage what tools/device_check.sh needs on a GPU machine with no network (docs/gpu.md).
#
# Run here, from the repository root, with .venv built (make install):
#     tools/device_stage.sh            # writes .device/c1 ... .device/cN
# Each .device/cK stays under the device tool's 64 MiB per call: c1 holds the wheels
# of skyhop's dependencies the GPU image lacks, Mosquitto with its libraries, the
# PP-OCR model files and the first part of onnxruntime-gpu's wheel; the others hold
# the rest of that wheel (255 MB; its CUDA kernels do not compress further).
set -euo pipefail
ORT=${ORT:-onnxruntime-gpu==1.31.1}    # built for CUDA 13 and cuDNN 9, as the image has
PART=64000000
dev=.device
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
rm -rf "$dev" && mkdir -p "$dev/c1/wheels" "$dev/whl"

pip_download() {
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$@"
}
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }

# Dependencies missing from the image (KINDS.md's package list), at .venv's versions.
deps=(paho-mqtt pydantic pydantic_core annotated-types typing-inspection typing_extensions
      tenacity cryptography cffi pycparser)
pip_download "$dev/c1/wheels" $(for d in "${deps[@]}"; do echo "$d==$(version "$d")"; done)
pip_download "$dev/whl" "$ORT"

# Mosquitto, with every library it links to except glibc's own.
mkdir -p "$dev/mosquitto/bin" "$dev/mosquitto/lib"
bin=$(command -v mosquitto || echo /usr/sbin/mosquitto)
cp "$bin" "$dev/mosquitto/lib/mosquitto.bin"
ldd "$bin" | awk '/=>/ {print $3}' | grep -vE '/(libc|libm|libresolv|ld-linux)[.-]' |
    xargs -I{} cp -L {} "$dev/mosquitto/lib/"
cat > "$dev/mosquitto/bin/mosquitto" <<'EOF'
#!/bin/sh
here=$(dirname "$(readlink -f "$0")")/../lib
LD_LIBRARY_PATH="$here" exec "$here/mosquitto.bin" "$@"
EOF
chmod +x "$dev/mosquitto/bin/mosquitto"
tar -cJf "$dev/c1/mosquitto.tar.xz" -C "$dev/mosquitto" .

.venv/bin/python - <<'EOF'
from skyhop.models import fetch, load_catalog
catalog = load_catalog()
for name in ("ppocr-det", "ppocr-rec", "ppocr-cls"):
    print(fetch(catalog.get(name), ".device/c1/models"))
EOF

# The wheel in parts: c1 takes what its other files leave room for.
wheel=$(ls "$dev"/whl/*.whl)
(cd "$dev/whl" && sha256sum "$(basename "$wheel")") > "$dev/c1/ort.sha256"
room=$((PART - $(du -sb "$dev/c1" | cut -f1)))
head -c "$room" "$wheel" > "$dev/c1/ort.part1"
size=$(stat -c %s "$wheel") offset=$room k=2
while [ "$offset" -lt "$size" ]; do
    mkdir -p "$dev/c$k"
    dd if="$wheel" of="$dev/c$k/ort.part$k" bs=1M iflag=skip_bytes,count_bytes \
        skip="$offset" count="$PART" status=none
    offset=$((offset + PART)) k=$((k + 1))
done
du -sh "$dev"/c*
