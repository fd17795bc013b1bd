# syntax=docker/dockerfile:1
# The image the GPU pipeline step (train) runs in: Python 3.11 + the project with its MLOps extra, CUDA torch.
#
# Build from the repository root:  docker build -f infra/docker/component-cuda.Dockerfile -t tfanet-component:0.1.0-cuda .
# Base images are pinned by tag here; pin them by digest at build time too (FROM image:tag@sha256:...).
#
# Why not an nvidia/cuda base: torch==2.14.1 from PyPI (the lock's pin) is a CUDA 13 build that brings its own CUDA
# runtime, cuDNN, cuBLAS and NCCL as pinned nvidia-* wheels, so an nvidia/cuda runtime image would only add a second
# copy of those libraries (and its Ubuntu 24.04 has Python 3.12, not our 3.11). The node needs an NVIDIA driver that
# supports CUDA 13 and the NVIDIA container toolkit, which mounts the driver into the container because of the two
# NVIDIA_* variables below (the same ones nvidia/cuda images set).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir pip==26.3
WORKDIR /src
COPY requirements.lock pyproject.toml README.md ./
COPY tfanet_core ./tfanet_core
COPY components ./components
COPY pipelines ./pipelines
RUN /opt/venv/bin/pip install --no-cache-dir -c requirements.lock ".[mlops]" \
    && /opt/venv/bin/pip check

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="tfanet-component" \
      org.opencontainers.image.description="tfanet pipeline steps (CUDA 13 torch)" \
      org.opencontainers.image.licenses="MIT"
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin tfanet
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    GX_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001
WORKDIR /home/tfanet
ENTRYPOINT ["tfanet"]
CMD ["--help"]
