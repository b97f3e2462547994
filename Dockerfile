# promptserve: CPU image by default (CPU torch wheels from the PyTorch CPU index).
# CUDA: docker build --build-arg BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime \
#                    --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 -t promptserve:cuda .
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Every cache the service or its libraries write (ONNX exports, open_clip/Hugging Face and torch hub
# weights) lives under /data/cache, a volume the non-root user owns: /app stays read-only to it.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PROMPTSERVE_HOST=0.0.0.0 \
    PROMPTSERVE_PORT=8000 \
    PROMPTSERVE_REGISTRY=/data/registry \
    PROMPTSERVE_ONNX_CACHE_DIR=/data/cache/onnx \
    HF_HOME=/data/cache/huggingface \
    TORCH_HOME=/data/cache/torch \
    XDG_CACHE_HOME=/data/cache

WORKDIR /app
# torch first, from the index that matches the base image (CPU wheels are ~10x smaller than CUDA ones).
# Versions are bounded by pyproject.toml; torchvision has to follow whichever torch the index resolves.
# hadolint ignore=DL3013
RUN pip install --index-url "${TORCH_INDEX_URL}" --extra-index-url https://pypi.org/simple "torch<=2.14.1" torchvision
COPY pyproject.toml README.md ./
COPY service ./service
COPY trainer ./trainer
COPY promptserve_client ./promptserve_client
# hadolint ignore=DL3013
RUN pip install ".[postgres]"

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
