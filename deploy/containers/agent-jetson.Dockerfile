# An edge agent on a Jetson (JetPack 6, L4T r36), installed from an aarch64 bundle.
#
#   skyhop bundle cam-7 --platform linux_aarch64 --python 3.10 --out cam-7.tar.gz \
#       --onnxruntime-wheel onnxruntime_gpu-1.23.0-cp310-cp310-linux_aarch64.whl
#   tar xzf cam-7.tar.gz
#   docker build -f deploy/containers/agent-jetson.Dockerfile --build-arg BUNDLE=skyhop-cam-7 .
#   docker run --runtime nvidia -v /var/lib/skyhop/cam-7:/var/lib/skyhop IMAGE
#
# The onnxruntime-gpu wheel is NVIDIA's for the device's JetPack (docs/deploy.md says
# where it comes from); without it the bundle holds PyPI's CPU wheel. The node's home
# (the bundle's home/ folder) is mounted: its config names the node, role and models.
FROM nvcr.io/nvidia/l4t-jetpack:r36.4.0
ARG BUNDLE
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
COPY ${BUNDLE}/wheels /tmp/wheels
RUN python3 -m venv /opt/skyhop \
 && PIP_CONFIG_FILE=/dev/null /opt/skyhop/bin/pip install --no-index --no-cache-dir \
        --find-links /tmp/wheels --requirement /tmp/wheels/requirements.txt \
 && rm -rf /tmp/wheels \
 && useradd --system --uid 10001 --groups video --no-create-home --shell /usr/sbin/nologin skyhop
ENV PATH=/opt/skyhop/bin:$PATH SKYHOP_HOME=/var/lib/skyhop PYTHONUNBUFFERED=1
USER 10001
VOLUME /var/lib/skyhop
# /metrics listens on loopback only: the health check reads it there.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s \
    CMD ["python3", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:9100/metrics', timeout=4)"]
ENTRYPOINT ["skyhop", "agent", "--metrics-port", "9100"]
