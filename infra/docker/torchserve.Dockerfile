# syntax=docker/dockerfile:1
# TorchServe 0.12.0 for one product's models: Java 17 JRE + a venv with torchserve, torch-model-archiver and the
# project. The .mar holds the bundle and the handler but not tfanet_core: the worker imports it from this venv.
#
# Build from the repository root:  docker build -f infra/docker/torchserve.Dockerfile -t tfanet-torchserve:0.1.0 .
# Base images are pinned by tag here; pin them by digest at build time too (FROM image:tag@sha256:...).
# CPU torch from PyTorch's CPU wheel index, the same versions as requirements.lock (see component.Dockerfile).
# config.properties is not baked in: the Deployment mounts it from a ConfigMap (infra/k8s/torchserve/).
# Upstream TorchServe is in limited maintenance (no security fixes); see infra/README.md.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir pip==26.3
WORKDIR /src
COPY requirements.lock ./
# PyPI cannot hold "+cpu" versions, so these two come from PyTorch's index; their dependencies follow the lock.
RUN /opt/venv/bin/pip install --no-cache-dir -c requirements.lock \
        --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple \
        torch==2.14.1+cpu torchvision==0.29.1+cpu
COPY pyproject.toml README.md ./
COPY tfanet_core ./tfanet_core
COPY components ./components
COPY pipelines ./pipelines
# boto3: the init container syncs the product's .mar files from S3 into the model store with components.storage.
RUN /opt/venv/bin/pip install --no-cache-dir -c requirements.lock . \
        torchserve==0.12.0 torch-model-archiver==0.12.0 boto3==1.43.117 \
    && /opt/venv/bin/pip check

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="tfanet-torchserve" \
      org.opencontainers.image.description="TorchServe 0.12.0 with tfanet (CPU torch)" \
      org.opencontainers.image.licenses="MIT"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Debian package versions are not pinned (hadolint DL3008 is ignored in infra/docker/hadolint.yaml): bookworm's
# security updates replace them, so an exact pin would stop the image building; the base tag/digest fixes the release.
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin model-server \
    && mkdir -p /home/model-server/model-store /home/model-server/work /home/model-server/config \
    && chown -R model-server:model-server /home/model-server
COPY --from=build /opt/venv /opt/venv
# TorchServe writes key_file.json (token auth), logs/ and its PID file relative to the working directory and TMPDIR.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    JAVA_HOME=/usr/lib/jvm/java-17-openjdk-amd64 \
    TMPDIR=/home/model-server/work \
    LOG_LOCATION=/home/model-server/work/logs \
    METRICS_LOCATION=/home/model-server/work/logs \
    DO_NOT_TRACK=1
USER 10001
WORKDIR /home/model-server/work
EXPOSE 8080 8081 8082
ENTRYPOINT ["torchserve", "--start", "--foreground", "--ncs", "--ts-config", "/home/model-server/config/config.properties"]
