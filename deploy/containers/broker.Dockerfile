# The broker (orchestrator) on a slim Python base, installed from a bundle's wheels.
#
#   skyhop bundle img-wheels --role client --out w.tar.gz --python 3.11 \
#       --with kubernetes --with pyyaml && tar xzf w.tar.gz   # the k8s pool backend
#   docker build -f deploy/containers/broker.Dockerfile --build-arg BUNDLE=skyhop-img-wheels .
#   docker run -v /srv/skyhop-broker:/var/lib/skyhop:ro IMAGE --mqtt mqtts://mqtt.internal:8883
#
# A client bundle's wheels are skyhop without ONNX Runtime: what a broker runs. The fleet
# home (config, pki/ca.crt, pki/broker.crt and .key, crl.pem) is mounted, never baked in.
FROM python:3.11-slim
ARG BUNDLE
COPY ${BUNDLE}/wheels /tmp/wheels
RUN python -m venv /opt/skyhop \
 && PIP_CONFIG_FILE=/dev/null /opt/skyhop/bin/pip install --no-index --no-cache-dir \
        --find-links /tmp/wheels --requirement /tmp/wheels/requirements.txt \
 && rm -rf /tmp/wheels \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin skyhop
ENV PATH=/opt/skyhop/bin:$PATH SKYHOP_HOME=/var/lib/skyhop PYTHONUNBUFFERED=1
USER 10001
VOLUME /var/lib/skyhop
# /metrics listens on loopback only: the health check reads it there.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:9100/metrics', timeout=4)"]
ENTRYPOINT ["skyhop", "broker", "--http-port", "9100", "--http-host", "0.0.0.0"]
