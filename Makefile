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

# Both run on WORKERS pytest-xdist workers that share one compilation cache (tests/conftest.py),
# a test file per worker at a time (--dist loadfile: a file's fixtures are built once).
# test: the fast tier, every module without the tests marked slow (whole trainings, killed and
# multi-process runs, wheels, the benchmark and GPU-check harnesses). test-all: every test, the
# longest files and the others with slow tests handed out first (tests/conftest.py orders them)
# so that the long ones start early and short ones fill the end (--no-loadscope-reorder keeps
# that order: by default xdist hands out the files with the most tests first).
WORKERS ?= 2
XDIST := -n $(WORKERS) --dist loadfile --durations=25
FAST_TIER := $(PY) -m pytest -q -m "not slow" $(XDIST)

test: install
	$(FAST_TIER)

test-all: install
	$(PY) -m pytest -q $(XDIST) --no-loadscope-reorder

clean:
	rm -rf $(VENV) .pytest_cache build dist *.egg-info
