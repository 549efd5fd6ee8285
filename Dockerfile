# syntax=docker/dockerfile:1
#
# vecshim CPU image: gunicorn + the bundled all-MiniLM-L6-v2, non-root, offline.
#
#   docker build -t vecshim:0.1.0 .
#   docker run -p 8080:8080 vecshim:0.1.0                 # bundled model, no config file
#   docker run -p 8080:8080 \
#     -v "$PWD/config.yaml:/etc/vecshim/config.yaml:ro" \
#     -e VECSHIM_CONFIG=/etc/vecshim/config.yaml \
#     -e OPENAI_API_KEY vecshim:0.1.0                     # your models; ${VAR}s come from -e
#
# Build args:
#   VECSHIM_EXTRAS   extras of setup.cfg to install (comma-separated; drop `local`
#                    and `onnx` for a hosted-API-only image without torch, ~10x
#                    smaller, and set ONNX_EXPORT=""; drop `onnx` (and ONNX_EXPORT)
#                    to serve the bundled model on torch)
#   ONNX_EXPORT      bundled-model exports made at build time, space-separated
#                    RUNTIME[:MAX_SEQ_LENGTH] ("onnx", "onnx onnx-int8", "onnx onnx:128",
#                    or "" for none), so no container exports at start; needs `onnx`
#                    in VECSHIM_EXTRAS
#   TORCH_VERSION    must match the pin of the `local` extra in setup.cfg
#   TORCH_INDEX_URL  where the CPU-only torch wheel comes from
#
# Layers, so that a source change rebuilds only the last, small ones:
#   deps     torch + every dependency, pinned by requirements.lock (scripts/image_build.py deps)
#   onnx     the ONNX export, keyed by the dependencies (model weights, library
#            versions) and the few modules that export; not by the rest of vecshim/
#   wheel    vecshim itself, built without dependencies
#   runtime  deps' venv + the exports + the wheel, checked to serve offline
# See docs/operations.md ("The image").

ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm
ARG VECSHIM_EXTRAS=local,onnx,openai,cohere,redis
ARG ONNX_EXPORT=onnx

# ------------------------------------------------------------------- deps ----
FROM ${PYTHON_IMAGE} AS deps

ARG VECSHIM_EXTRAS
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /build
# Only what decides the dependencies: setup.cfg's extras and the lock.
COPY setup.cfg requirements.lock scripts/image_build.py ./
RUN python image_build.py deps

# ------------------------------------------------------------------- onnx ----
FROM deps AS onnx

ARG VECSHIM_EXTRAS
ARG ONNX_EXPORT
ENV VECSHIM_ONNX_CACHE=/opt/vecshim/onnx \
    HF_HOME=/tmp/hf

# The modules the export runs, and no others.
COPY vecshim/__init__.py vecshim/backend.py vecshim/cpus.py vecshim/errors.py vecshim/hookspecs.py vecshim/reranker.py /export/vecshim/
COPY vecshim/backends/__init__.py vecshim/backends/local.py vecshim/backends/runtimes.py vecshim/backends/onnx_light.py /export/vecshim/backends/
RUN mkdir -p /opt/vecshim/onnx \
 && PYTHONPATH=/export python image_build.py export \
 && rm -rf /tmp/hf

# ------------------------------------------------------------------ wheel ----
FROM deps AS wheel

COPY pyproject.toml setup.cfg README.md ./
COPY vecshim ./vecshim
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------- runtime ----
FROM ${PYTHON_IMAGE} AS runtime

ARG VECSHIM_EXTRAS

LABEL org.opencontainers.image.title="vecshim" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.description="Weaviate text2vec-transformers inference API for any embedding backend" \
      org.opencontainers.image.licenses="BSD-3-Clause"

RUN groupadd --system --gid 10001 vecshim \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin vecshim \
 && mkdir -p /etc/vecshim

COPY --from=deps /opt/venv /opt/venv
COPY --from=onnx /opt/vecshim/onnx /opt/vecshim/onnx

# No VECSHIM_CONFIG here: without it vecshim serves the bundled model. Mount a
# file at /etc/vecshim/config.yaml and set VECSHIM_CONFIG to use your own.
# HF_HOME/XDG_CACHE_HOME point into /tmp so a read-only root filesystem works.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/tmp/huggingface \
    XDG_CACHE_HOME=/tmp/.cache \
    VECSHIM_ONNX_CACHE=/opt/vecshim/onnx

# vecshim itself (no dependencies: they are all in the deps layer), then fail the
# build, not the first pod, if the bundled model can't load offline from the exports.
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    --mount=type=bind,source=scripts/image_build.py,target=/build/image_build.py \
    pip install --no-cache-dir --no-deps --no-index /wheels/vecshim-*.whl \
 && python /build/image_build.py check \
 && rm -rf /tmp/huggingface /tmp/.cache

WORKDIR /srv/vecshim
USER 10001:10001
EXPOSE 8080

# gunicorn shuts down gracefully on SIGTERM (graceful_timeout 30 s).
STOPSIGNAL SIGTERM

# 204 once every required model is loaded and warmed up; urllib raises on 503. slim has no curl.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:8080/.well-known/ready', timeout=2); sys.exit(0 if r.status == 204 else 1)"]

ENTRYPOINT ["vecshim"]
CMD ["serve", "--bind", "0.0.0.0:8080"]
