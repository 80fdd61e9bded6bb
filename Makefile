# Set-up and checks. Everything lives in .venv; torch is installed first from the pinned CPU wheel so that
# nothing can pull a CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: install install-test sample test test-slow lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(VENV)/.runtime

install: $(VENV)/.runtime

install-test: $(VENV)/.test

# make sample MODEL=path/to/model PROMPT="a photo of an astronaut riding a horse" [ARGS="--steps 20 -n 2"]
PROMPT ?= a photo of an astronaut riding a horse
sample: install
	@test -n "$(MODEL)" || { echo "make sample: set MODEL=PATH (a diffusers folder or a single-file .safetensors checkpoint)" >&2; exit 2; }
	$(BIN)/python sample.py "$(PROMPT)" --model "$(MODEL)" --out outputs $(ARGS)

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Two workers (one per core), tests grouped (xdist_group) where they share costly module fixtures.
test: lint
	$(BIN)/pytest -q -n 2 --dist loadgroup

test-slow: install-test
	SDJAX_TEST_XLA_OPT=full $(BIN)/pytest -q -m slow -s

format: install-test
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
