# Two entry points, each doing its own setup in a fresh virtual environment:
#   make train   DP training on PneumoniaMNIST (the main job; ARGS="--epsilon 1" passes flags)
#   make test    the test suite
# torch is installed first and pinned to the CPU build these machines carry (no CUDA download).

VENV      ?= .venv
PY        := $(VENV)/bin/python
# Data: DATA_DIR=… if given, else dpfunc's lookup ($DPFUNC_DATA, ../shared/data, ~/.cache/dpfunc).
DATA_DIR  ?=
TORCH     ?= torch==2.13.0
ARGS      ?=

.PHONY: train test bench venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"
	touch $@

# Each `make train` writes a new run folder (runs/cnn-eps3.0-seed0, then -2, -3, …); ARGS="--resume" continues.
train: venv
	$(VENV)/bin/dpfunc train $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(ARGS)

test: venv
	$(PY) -m pytest -q $(ARGS)

bench: venv
	$(PY) bench/accounting.py
	$(PY) bench/speed.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis
