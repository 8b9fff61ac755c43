# syntax=docker/dockerfile:1
# voicegw: multi-stage, slim, non-root. CPU torch by default; for CUDA build with
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the chosen index, so the project's dependency on it installs nothing more.
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install .

FROM python:${PYTHON_VERSION}-slim
RUN groupadd --gid 10001 voicegw \
 && useradd --create-home --uid 10001 --gid 10001 voicegw
COPY --from=build /opt/venv /opt/venv
COPY web /app/web
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    VOICEGW_WEB_DIR=/app/web \
    VOICEGW_SERVER__HOST=0.0.0.0 \
    HF_HOME=/home/voicegw/.cache/huggingface
USER 10001:10001
WORKDIR /home/voicegw
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["voicegw", "serve"]
