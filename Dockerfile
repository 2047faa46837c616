# tgi-gateway: the OpenAI-compatible gateway alone (TGI runs in its own container; see compose.yaml).
#
#   docker build -t tgi-gateway .
#   docker run --rm -p 8000:8000 tgi-gateway --model meetkai/functionary-small-v3.2 --endpoint http://<tgi>:80

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# Build the project's wheel; the sources and the build backend stay in this stage.
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tgi_gateway/ tgi_gateway/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
# Listen on all interfaces (a container's loopback is unreachable from outside), and never try to start
# TGI with Docker from inside the container: point --endpoint at a running TGI.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/data \
    TGI_GATEWAY_HOST=0.0.0.0 \
    TGI_GATEWAY_PORT=8000 \
    TGI_GATEWAY_LAUNCH=false \
    TGI_GATEWAY_DATA_DIR=/var/lib/tgi-gateway
# Runtime dependencies only (no [test] extra); every one of them ships manylinux wheels, so no compiler.
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-cache-dir /tmp/wheels/*.whl && rm -rf /tmp/wheels
# A non-root user; /data is the Hugging Face cache (HF_HOME), writable by it when nothing is mounted there;
# /var/lib/tgi-gateway (TGI_GATEWAY_DATA_DIR) holds the response store, responses.db: a volume, so stored
# responses outlive the container (mount a named volume there, or use --response-store postgresql://...).
RUN useradd --system --uid 10001 --user-group --home-dir /home/gateway --create-home \
        --shell /usr/sbin/nologin gateway \
    && mkdir -p /data /var/lib/tgi-gateway && chown gateway:gateway /data /var/lib/tgi-gateway
VOLUME /var/lib/tgi-gateway
USER gateway
WORKDIR /home/gateway
EXPOSE 8000
# The slim image has no curl. /health is 200 only while TGI answers its own /health. The probe follows
# TGI_GATEWAY_PORT: change the port with that variable rather than with --port.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('TGI_GATEWAY_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["tgi-gateway"]
