# syntax=docker/dockerfile:1
# The gateway image: loragate only (workers run in vLLM's own image on GPU hosts).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY loragate loragate
COPY server server
COPY router router
COPY adapters adapters
COPY workers workers
COPY loadtest loadtest
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 loragate
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER loragate
WORKDIR /home/loragate
ENV LORAGATE_HOST=0.0.0.0 LORAGATE_PORT=8000 LORAGATE_DATA_DIR=/home/loragate/data
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]
ENTRYPOINT ["loragate"]
CMD ["serve"]
