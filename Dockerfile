# syntax=docker/dockerfile:1
#
# vecshim CPU image: gunicorn + the bundled all-MiniLM-L6-v2, non-root, offline.
#
#   docker build -t vecshim .
#   docker run -p 8080:8080 vecshim                      # bundled model, no config file
#   docker run -p 8080:8080 \
#     -v "$PWD/config.yaml:/etc/vecshim/config.yaml:ro" \
#     -e VECSHIM_CONFIG=/etc/vecshim/config.yaml \
#     -e OPENAI_API_KEY vecshim                           # your models; ${VAR}s come from -e
#
# Build args:
#   VECSHIM_EXTRAS   extras of setup.cfg to install (comma-separated; drop `local`
#                    and `onnx` for a hosted-API-only image without torch, ~10x
#                    smaller; drop `onnx` to serve the bundled model on torch)
#   ONNX_EXPORT      runtimes exported into the image at build time (space-separated:
#                    "onnx", "onnx onnx-int8", or "" for none), so no pod exports at start;
#                    needs `onnx` in VECSHIM_EXTRAS, e.g.
#                    --build-arg VECSHIM_EXTRAS=local,onnx,openai,cohere,redis --build-arg ONNX_EXPORT="onnx onnx-int8"
#   TORCH_VERSION    must match the pin of the `local` extra in setup.cfg
#   TORCH_INDEX_URL  where the CPU-only torch wheel comes from
# See docs/operations.md.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- builder ----
FROM ${PYTHON_IMAGE} AS builder

ARG VECSHIM_EXTRAS=local,onnx,openai,cohere,redis
ARG ONNX_EXPORT=onnx
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VECSHIM_ONNX_CACHE=/opt/vecshim/onnx

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from the CPU index: otherwise sentence-transformers pulls the
# multi-GB CUDA build. Only when the `local` extra is wanted.
RUN case ",${VECSHIM_EXTRAS}," in \
      *,local,*|*,onnx,*|*,all,*) pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" ;; \
      *) echo "no local extra: skipping torch" ;; \
    esac

WORKDIR /src
# Only what the build needs (setup.cfg reads README.md and vecshim/__init__.py).
COPY pyproject.toml setup.cfg README.md ./
COPY vecshim ./vecshim
RUN pip install ".[${VECSHIM_EXTRAS}]"

# Export (and int8-quantise) the bundled model for ONNX Runtime once, here: the
# runtime stage reads /opt/vecshim/onnx and never exports at start.
RUN mkdir -p /opt/vecshim/onnx \
 && for rt in ${ONNX_EXPORT}; do \
      case ",${VECSHIM_EXTRAS}," in *,onnx,*|*,all,*) ;; *) echo "ONNX_EXPORT needs the onnx extra" >&2; exit 1 ;; esac; \
      HF_HUB_OFFLINE=1 HF_HOME=/tmp/hf python -c "import sys; from vecshim.backends.local import SentenceTransformersBackend as B; b = B(B.Options(runtime=sys.argv[1])); b.concurrency = 1; b.load()" "$rt" || exit 1; \
    done

# Fail the build, not the first pod, when the bundled model can't load offline.
RUN case ",${VECSHIM_EXTRAS}," in \
      *,local,*|*,onnx,*|*,all,*) HF_HUB_OFFLINE=1 HF_HOME=/tmp/hf vecshim embed --quiet "build check" > /dev/null \
                         && rm -rf /tmp/hf ;; \
      *) vecshim backends ;; \
    esac

# ---------------------------------------------------------------- runtime ----
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="vecshim" \
      org.opencontainers.image.description="Weaviate text2vec-transformers inference API for any embedding backend" \
      org.opencontainers.image.licenses="BSD-3-Clause"

RUN groupadd --system --gid 10001 vecshim \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin vecshim \
 && mkdir -p /etc/vecshim

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/vecshim/onnx /opt/vecshim/onnx

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

WORKDIR /srv/vecshim
USER 10001:10001
EXPOSE 8080

# gunicorn shuts down gracefully on SIGTERM (graceful_timeout 30 s).
STOPSIGNAL SIGTERM

# 204 once every model is loaded and warmed up; urllib raises on 503. slim has no curl.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:8080/.well-known/ready', timeout=2); sys.exit(0 if r.status == 204 else 1)"]

ENTRYPOINT ["vecshim"]
CMD ["serve", "--bind", "0.0.0.0:8080"]
