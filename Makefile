# Set-up and checks. Everything lives in .venv; torch is installed first from the pinned CPU wheel so that
# nothing can pull a CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: install install-test sample demo-model test test-slow lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# k-diffusion's samplers are the reference for DPM++ 2S a (no diffusers class); its own requirements
	# (torchvision, wandb, kornia, ...) are not needed for the sampling functions the tests load
	$(BIN)/pip install -q --no-deps k-diffusion==0.1.1.post1
	touch $@ $(VENV)/.runtime

install: $(VENV)/.runtime

install-test: $(VENV)/.test

# make sample [PROMPT="an emoji of red apple"] [MODEL=path/to/model] [ARGS="--steps 20 -n 2"]
# Without MODEL: the bundled 64x64 emoji demo model.
PROMPT ?= an emoji of red apple
sample: install
	$(BIN)/python sample.py "$(PROMPT)" $(if $(MODEL),--model "$(MODEL)") --out outputs $(ARGS)

# Rebuilds the bundled demo model (sdjax/data/demo) on this machine's CPU: the colour-and-shape emoji set (needs
# Debian's fonts-noto-color-emoji), the VAE, then the UNet and text encoder. How long each step takes: README.md,
# "The bundled demo model". Remove runs/ first: runs resume from their checkpoints.
demo-model: install-test
	$(BIN)/pip install -q -e '.[train]'
	$(BIN)/python -m train.emoji_colours --out data/emoji-colours --thumbnails tests/data/emoji_colours_32.npz
	$(BIN)/python -m train --config configs/emoji_vae.py --data data/emoji-colours --output runs/emoji-vae
	$(BIN)/python -m train --config configs/emoji_unet.py --data data/emoji-colours --model runs/emoji-vae/final --output runs/emoji-unet
	rm -rf sdjax/data/demo && cp -r runs/emoji-unet/final sdjax/data/demo
	$(BIN)/python -m train.contact_sheet --data data/emoji-colours --out docs/demo_contact_sheet.png

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python tests/test_architecture.py

# One pytest process per test file (the light files share a few: tests/run_suite.py), three at a time on two
# cores (a process waits on Python, files and subprocesses part of the time; README.md "Tests"), the slowest
# files of the last run first; a summary table of seconds per process at the end. One file:
# $(BIN)/pytest tests/test_x.py
test: lint
	$(BIN)/python tests/run_suite.py --jobs 3 -- --durations=5

test-slow: install-test
	SDJAX_TEST_XLA_OPT=full $(BIN)/python tests/run_suite.py --jobs 1 -- -m slow -s --durations=0

format: install-test
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache tests/.durations.json
