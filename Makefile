# Two entry points, each doing its own setup in a fresh virtual environment:
#   make train   DP training on PneumoniaMNIST (the main job)
#   make test    the test suite
# torch is installed first and pinned to the CPU build these machines carry (no CUDA download).

VENV      ?= .venv
PY        := $(VENV)/bin/python
DATA_DIR  ?= $(or $(DPFUNC_DATA),../shared/data)
TORCH     ?= torch==2.13.0
ARGS      ?=

.PHONY: train test bench venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"
	touch $@

train: venv
	$(VENV)/bin/dpfunc train --data-dir $(DATA_DIR) $(ARGS)

test: venv
	$(PY) -m pytest -q $(ARGS)

bench: venv
	$(PY) bench/accounting.py
	$(PY) bench/speed.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis
