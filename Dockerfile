# keras-server's images, two targets of one file:
#
#   full (the default): every role, every engine: `--role worker` (the model),
#        `--role web` (granian) and `--role all` (both under one command, the
#        default command).
#   web: `--role web` alone (the default command): the base install and the
#        otel extra (tracing), no TensorFlow, OpenVINO or ONNX Runtime. Web
#        replicas need no more.
#
#   docker build -t keras-server .
#   docker build --target web -t keras-server-web .
#   docker run -p 5000:5000 keras-server --weights none        # --role all, random weights
#
# Build arguments:
#   BASE_IMAGE   any Debian-like image with python3 (>= 3.11) and its venv module
#   WEIGHTS_URL  (full only) a model or weights file (.keras, .weights.h5, .h5)
#                fetched at build time into /models, then served with
#                `--model /models/NAME.keras` or `--weights /models/NAME.h5`. Or
#                leave it out and mount the files at run time:
#                `-v "$PWD/models:/models:ro"`.
#   PIP_CERT     a CA bundle path for pip inside the build (a TLS-intercepting
#                proxy); the file itself must be mounted into the build
#                (`podman build -v /etc/ssl/certs/ca-certificates.crt:/ca.pem:ro
#                --build-arg PIP_CERT=/ca.pem`). Not needed with plain internet access.
ARG BASE_IMAGE=python:3.11-slim

# What both images share: the venv, the user, the base dependencies, how to run.
FROM ${BASE_IMAGE} AS base

ARG PIP_CERT

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    PATH=/opt/venv/bin:$PATH \
    # Listen on every interface of the container (the server's own default is loopback).
    KERAS_SERVER_HOST=0.0.0.0 \
    KERAS_SERVER_PORT=5000

# An unprivileged user owning nothing but its home (Keras's cache lives there).
RUN groupadd --system --gid 10001 keras \
    && useradd --system --uid 10001 --gid keras --create-home --home-dir /home/keras \
        --shell /usr/sbin/nologin keras \
    && mkdir -p /models

# The dependencies before the code, so that a code change rebuilds neither
# layer: pyproject.toml with an empty package installs exactly its
# dependencies (the empty package is replaced below). With the otel extra, so
# that every role of both images can send traces when asked.
COPY pyproject.toml LICENSE /src/
RUN if [ -z "${PIP_CERT:-}" ]; then unset PIP_CERT; fi \
    && python3 -m venv /opt/venv \
    && mkdir /src/keras_server && touch /src/keras_server/__init__.py \
    && /opt/venv/bin/pip install --no-cache-dir "/src[otel]"

WORKDIR /home/keras
EXPOSE 5000
# /healthz of the HTTP server. A worker has no HTTP server: compose and
# Kubernetes give workers their own check (see compose.yaml).
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('KERAS_SERVER_PORT', '5000') + '/healthz', timeout=4)"]
ENTRYPOINT ["keras-server"]
CMD []

# The engines' dependencies on top of the base's.
FROM base AS engines
ARG PIP_CERT
RUN if [ -z "${PIP_CERT:-}" ]; then unset PIP_CERT; fi \
    && /opt/venv/bin/pip install --no-cache-dir "/src[all]"

ARG WEIGHTS_URL=""
RUN if [ -n "${WEIGHTS_URL}" ]; then \
        if [ -n "${PIP_CERT:-}" ]; then export SSL_CERT_FILE="${PIP_CERT}"; fi; \
        cd /models && python3 -c 'import sys, urllib.request; \
url = sys.argv[1]; name = url.rstrip("/").rsplit("/", 1)[-1].split("?")[0]; \
urllib.request.urlretrieve(url, name); print("baked in /models/" + name)' "${WEIGHTS_URL}" \
        && chmod -R a+rX /models; \
    fi

# The web tier: the base install and the package.
FROM base AS web
ARG PIP_CERT
COPY keras_server/ /src/keras_server/
RUN if [ -z "${PIP_CERT:-}" ]; then unset PIP_CERT; fi \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps --force-reinstall /src \
    && rm -rf /src
USER keras
CMD ["--role", "web"]

# Every role and engine (the default target: the last stage).
FROM engines AS full
ARG PIP_CERT
COPY keras_server/ /src/keras_server/
RUN if [ -z "${PIP_CERT:-}" ]; then unset PIP_CERT; fi \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps --force-reinstall /src \
    && rm -rf /src
USER keras
