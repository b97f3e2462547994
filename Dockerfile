# promptserve: CPU image by default.
# CUDA: docker build --build-arg BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime \
#                    --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 -t promptserve:cuda .
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    PROMPTSERVE_HOST=0.0.0.0 \
    PROMPTSERVE_PORT=8000 \
    PROMPTSERVE_REGISTRY=/data/registry

WORKDIR /app
# torch first, from the index that matches the base image (CPU wheels are ~10x smaller).
RUN pip install --index-url ${TORCH_INDEX_URL} --extra-index-url https://pypi.org/simple "torch<=2.14.1" torchvision
COPY pyproject.toml README.md ./
COPY service ./service
COPY trainer ./trainer
COPY promptserve_client ./promptserve_client
RUN pip install .

RUN useradd --create-home --uid 10001 promptserve \
    && mkdir -p /data/registry && chown promptserve /data/registry
USER promptserve
VOLUME ["/data/registry"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
CMD ["python", "-m", "service"]
