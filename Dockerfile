# CPU image by default; for CUDA: docker build --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t live-v2v:cuda .
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
# torch alone first, from the index that matches the base image, at the version pinned in
# pyproject.toml (read from there, as README's install lines do); then the rest from PyPI, torch's
# own dependencies included.
RUN pip install --no-deps --index-url "${TORCH_INDEX}" "$(grep -o 'torch==[0-9.]*' pyproject.toml)" \
    && pip install .

# The service runs as `app`, UID 1000 (the usual first user on a host, so a models folder of
# theirs mounted at /models is writable). Ubuntu's images (the CUDA base) already have a UID 1000
# user, `ubuntu`: it is removed first. Debian's python image has none.
RUN existing="$(awk -F: '$3 == 1000 { print $1 }' /etc/passwd)" \
    && if [ -n "$existing" ]; then userdel "$existing" && rm -rf "/home/$existing"; fi \
    && useradd --create-home --uid 1000 --user-group app \
    && mkdir -p /models && chown app:app /models
USER app
EXPOSE 8000
# Follows LIVE_V2V_PORT (`docker run -e LIVE_V2V_PORT=9000`); /health needs no token.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD python3 -c "import os, sys, urllib.request; port = os.environ.get('LIVE_V2V_PORT') or '8000'; sys.exit(urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=4).status != 200)"
CMD ["live-v2v", "serve"]
