# CPU image by default; for CUDA: docker build --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 \
    LIVE_V2V_HOST=0.0.0.0 LIVE_V2V_PORT=8000 LIVE_V2V_MODELS_DIR=/models

RUN if ! command -v python3 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
        && rm -rf /var/lib/apt/lists/*; fi \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY pyproject.toml README.md ./
COPY protocol protocol
COPY runtime runtime
COPY live live
COPY batch batch
COPY web web
# torch first, from the index that matches the base image, at the version pinned in pyproject.toml.
RUN pip install --index-url "${TORCH_INDEX}" "torch==2.13.0" && pip install .

RUN useradd --create-home --uid 1000 app && mkdir -p /models && chown app /models
USER app
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD python3 -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"
CMD ["live-v2v", "serve"]
