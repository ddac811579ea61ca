# A cloud pool worker: skyhop agent --role cloud on a CUDA runtime base, onnxruntime-gpu.
#
#   pip download --no-deps --only-binary=:all: -d ort onnxruntime-gpu
#   skyhop bundle img-wheels --role cloud --python 3.12 --out w.tar.gz \
#       --onnxruntime-wheel ort/onnxruntime_gpu-*.whl --with nvidia-ml-py \
#       --with kubernetes --with pyyaml && tar xzf w.tar.gz   # `skyhop k8s unpack` in a pod
#   docker build -f deploy/containers/cloud-worker.Dockerfile --build-arg BUNDLE=skyhop-img-wheels .
#   docker run --gpus 1 -v /srv/pool-1:/var/lib/skyhop IMAGE --node-id pool-1 --models digits
#
# onnxruntime-gpu 1.31+ is built for CUDA 13 and cuDNN 9 (docs/gpu.md); the base brings
# both. The worker's home (its certificate, the worker keys, models) is mounted.
FROM nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04
ARG BUNDLE
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
COPY ${BUNDLE}/wheels /tmp/wheels
RUN python3 -m venv /opt/skyhop \
 && PIP_CONFIG_FILE=/dev/null /opt/skyhop/bin/pip install --no-index --no-cache-dir \
        --find-links /tmp/wheels --requirement /tmp/wheels/requirements.txt \
 && rm -rf /tmp/wheels \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin skyhop
ENV PATH=/opt/skyhop/bin:$PATH SKYHOP_HOME=/var/lib/skyhop PYTHONUNBUFFERED=1
USER 10001
VOLUME /var/lib/skyhop
# /metrics listens on loopback only: the health check reads it there.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s \
    CMD ["python3", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:9100/metrics', timeout=4)"]
ENTRYPOINT ["skyhop", "agent", "--role", "cloud", "--metrics-port", "9100"]
