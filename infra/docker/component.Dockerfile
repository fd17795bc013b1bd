# syntax=docker/dockerfile:1
# The image every Kubeflow pipeline step runs in (CPU variant): Python 3.11 + the project with its MLOps extra.
#
# Build from the repository root:  docker build -f infra/docker/component.Dockerfile -t tfanet-component:0.1.0-cpu .
# Base images are pinned by tag here; pin them by digest at build time too (FROM image:tag@sha256:...) once you
# have pulled them, so a re-pushed tag cannot change the image under you.
#
# Why a different torch source from requirements.lock: the lock pins torch==2.14.1 / torchvision==0.29.1 as PyPI
# ships them, a CUDA 13 build that drags ~3 GB of nvidia-* wheels. PyTorch's own CPU wheel index has the same
# versions built without CUDA (2.14.1+cpu); "==2.14.1" in the lock accepts that local version, so every other pin
# of the lock still applies and the nvidia-* and triton pins simply stay unused.

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
# psycopg2-binary: the MLflow server (infra/k8s/base/mlflow.yaml) runs from this image on a Postgres backend.
RUN /opt/venv/bin/pip install --no-cache-dir -c requirements.lock ".[mlops]" psycopg2-binary==2.9.13 \
    && /opt/venv/bin/pip check

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="tfanet-component" \
      org.opencontainers.image.description="tfanet pipeline steps (CPU torch)" \
      org.opencontainers.image.licenses="MIT"
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin tfanet
COPY --from=build /opt/venv /opt/venv
# No telemetry from MLflow, great-expectations or anything honouring DO_NOT_TRACK (as `import components` does).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    GX_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1
USER 10001
WORKDIR /home/tfanet
ENTRYPOINT ["tfanet"]
CMD ["--help"]
