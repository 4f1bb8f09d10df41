# Set-up is part of each target: a fresh clone needs only Python ≥ 3.10 and make.
PYTHON ?= python3
VENV   ?= .venv
PROMPT ?= a photograph of an astronaut riding a horse
MODEL  ?= stable-diffusion-v1-5/stable-diffusion-v1-5
OUT    ?= astronaut.png
ARGS   ?=

BIN := $(VENV)/bin

.PHONY: generate test lint

generate: $(VENV)/.installed
	$(BIN)/ldm generate "$(PROMPT)" --model "$(MODEL)" -o "$(OUT)" $(ARGS)

test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/pytest

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@ $(VENV)/.installed
