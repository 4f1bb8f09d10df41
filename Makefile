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
	$(BIN)/lint-imports
	$(BIN)/pytest

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# setuptools warns, for every editable install whose folders are renamed (cli/ → ldm_cli, kernels/ → ldm_kernels),
# that folders of the working directory could shadow the package: here they are the package. Not shown.
QUIET_EDITABLE := PYTHONWARNINGS="ignore:Editable installation"

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(QUIET_EDITABLE) $(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(QUIET_EDITABLE) $(BIN)/pip install --quiet -e ".[test]"
	touch $@ $(VENV)/.installed
