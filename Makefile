# Two commands a newcomer needs: `make train` and `make test`. Both set up .venv first (once).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup train test lint format benchmark gpu-check clean

setup: $(STAMP)

# torch==2.13.0 is pinned and installed first: it is the local CPU build, and a looser
# requirement would pull gigabytes of CUDA packages. The package itself accepts torch >= 2.4.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/nin train $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks hubconf.py
	$(BIN)/ruff format --check src tests benchmarks hubconf.py

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks hubconf.py
	$(BIN)/ruff check --fix src tests benchmarks hubconf.py

benchmark: $(STAMP)
	$(BIN)/python benchmarks/cpu_default.py
	$(BIN)/python benchmarks/cpu_switches.py

# The GPU check (benchmarks/gpu_check.py): every CUDA path and every GPU figure in at most
# 8 minutes, written into docs/. SMOKE=1: the same steps with tiny sizes on any device (about a
# minute or so on a CPU; writes runs/gpu-check only). DATA_DIR=DIR: where the data sets are (default
# $NIN_DATA_DIR or ~/.cache/nin; never downloaded). NOVENV=1: run with $(PYTHON) and this
# checkout's src/ instead of setting up .venv (a GPU machine with torch and no package index).
gpu-check: $(if $(NOVENV),,$(STAMP))
	PYTHONPATH=src$${PYTHONPATH:+:$$PYTHONPATH} $(if $(NOVENV),$(PYTHON),$(BIN)/python) \
		benchmarks/gpu_check.py $(if $(SMOKE),--smoke) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
