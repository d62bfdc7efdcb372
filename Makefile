# `make train`, `make test` and `make test-all` each create the virtual environment they need.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# The torch that parity is tested with, unless .venv already has one. On Linux PyPI's default
# wheel is a CUDA build; for the CPU one:
#   make install TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0
ARGS ?=

.PHONY: install train test test-all clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[train,parity,export,dev]"
	touch $@

train: install
	$(PY) scripts/train.py $(ARGS)

# The fast tier: every module, without the tests marked slow (whole trainings, killed and
# multi-process runs, wheels, the benchmark and GPU-check harnesses), on WORKERS pytest-xdist
# workers that share one compilation cache (tests/conftest.py). test-all runs the fast tier so,
# then the slow tier in one process: its tests time, kill and count processes of their own.
WORKERS ?= 2
FAST_TIER := $(PY) -m pytest -q -m "not slow" -n $(WORKERS) --dist loadfile --durations=25

test: install
	$(FAST_TIER)

test-all: install
	$(FAST_TIER)
	$(PY) -m pytest -q -m slow --durations=25

clean:
	rm -rf $(VENV) .pytest_cache build dist *.egg-info
