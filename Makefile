# vecshim developer entry points. Every target sets up .venv itself.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
# Extra pip arguments for torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=
export HF_HUB_OFFLINE ?= 1
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: setup serve test test-fast deploy-check bench bench-hosted system-deps clean

setup: $(VENV)/.installed

# torch first, pinned, so sentence-transformers does not pull a multi-GB CUDA build.
$(VENV)/.installed: setup.cfg pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 $(TORCH_PIP_ARGS)
	$(BIN)/pip install -q -c requirements.lock -e '.[all,test]'
	touch $@

serve: setup
	$(BIN)/vecshim serve --bind 0.0.0.0:8080 $(if $(CONFIG),--config $(CONFIG))

# Tests start their own redis-server and render /docs in headless Chromium;
# install both from Debian packages if this machine lacks them.
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

# Every test, slow ones included, on four pytest-xdist workers (2 cores here, but many tests
# wait on servers and sleeps; beside two CPU-bound loops, 4 workers took 376 s, 3 took 440 s).
# Each test module (each class in test_conformance.py) stays on one worker, so module-scoped
# servers and exports are shared as in a plain run; tests/conftest.py hands out the longest
# modules first. TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 4
XDIST = $(if $(filter 0,$(TEST_WORKERS)),-p no:xdist,-n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder)

test: setup system-deps
	$(BIN)/python -m pytest $(XDIST)

test-fast: setup
	$(BIN)/python -m pytest $(XDIST) -m "not slow"

# Deploy artefacts without a container engine: hadolint, the Compose Specification
# schema, kubectl kustomize + kubernetes-validate --strict (all from the test extra),
# the image's build steps in a fresh venv, the shipped configs served with no secrets.
# `make test` runs these too.
deploy-check: setup
	$(BIN)/python -m pytest -q tests/test_deploy.py tests/test_deploy_build.py tests/test_optional_models.py

bench: setup
	$(BIN)/python bench/run_all.py

# Issue 5: rate-limited fake OpenAI upstream, micro-batched vs one text per call.
bench-hosted: setup
	$(BIN)/python bench/hosted.py --duration 15 --max-size 32 --max-wait-ms 30

# Re-pin requirements.lock from the current venv (after changing setup.cfg).
lock: setup
	{ echo "# Exact versions the test suite passed with ($$(date -u +%F), Python 3.11, Linux x86_64)."; \
	  echo "# make setup installs with these as constraints; regenerate with: make lock"; \
	  $(BIN)/pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; } > requirements.lock

clean:
	rm -rf $(VENV) build *.egg-info
