# promptserve: CPU image by default (CPU torch wheels from the PyTorch CPU index).
# CUDA: docker build --build-arg BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime \
#                    --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 -t promptserve:cuda .
# The base image is pinned to a release; pin it to a digest too (BASE_IMAGE=python:...@sha256:...) where the
# build must be reproducible byte for byte.
ARG BASE_IMAGE=python:3.11.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.5.1
ARG TORCHVISION_VERSION=0.20.1
# Every cache the service or its libraries write (ONNX exports, open_clip/Hugging Face and torch hub
# weights) lives under /data/cache, a volume the non-root user owns: /app stays read-only to it, and the
# root filesystem can be mounted read-only (Kubernetes does; /tmp is then a writable volume of its own).
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PROMPTSERVE_HOST=0.0.0.0 \
    PROMPTSERVE_PORT=8000 \
    PROMPTSERVE_REGISTRY=/data/registry \
    PROMPTSERVE_ONNX_CACHE_DIR=/data/cache/onnx \
    HF_HOME=/data/cache/huggingface \
    TORCH_HOME=/data/cache/torch \
    XDG_CACHE_HOME=/data/cache

WORKDIR /app
# torch and torchvision first, pinned, from the one index that matches the base image and from no other
# (so no package of the same name elsewhere can stand in for them); their own dependencies come with the
# project's from PyPI in the next step, which keeps these exact versions.
RUN pip install --index-url "${TORCH_INDEX_URL}" --no-deps "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
COPY pyproject.toml README.md ./
COPY service ./service
COPY trainer ./trainer
COPY promptserve_client ./promptserve_client
# The project itself: its dependencies are bounded by pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".[postgres]" "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

RUN useradd --create-home --uid 10001 promptserve \
    && mkdir -p /data/registry /data/cache/onnx /data/cache/huggingface /data/cache/torch \
    && chown -R 10001:10001 /data
USER 10001
VOLUME ["/data/registry", "/data/cache"]
EXPOSE 8000
# Healthy while it can serve: neither a registry outage nor one damaged task fails it (strict /readyz does).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz?require_registry=false&require_tasks=false', timeout=4)"]
CMD ["python", "-m", "service"]
