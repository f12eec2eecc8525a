# Two commands a newcomer needs: `make train` and `make test`. Both set up .venv first (once).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup train test lint format benchmark gpu-check docs clean

setup: $(STAMP)

# What PyTorch the virtual environment gets (read once, when .venv is made; `make clean` to redo):
# - default, TORCH=torch==2.13.0: that pin is installed first, from pip's index. On Linux, PyPI's
#   wheel of it is the CUDA build, which brings several GB of NVIDIA libraries; on macOS and
#   Windows, and where the index serves the CPU build, it is a few hundred MB.
# - TORCH_INDEX=https://download.pytorch.org/whl/cpu: the same pin from PyTorch's CPU-only index.
# - TORCH= (empty): keep the PyTorch that $(PYTHON) already has; .venv sees its site-packages
#   and only what is missing is installed (torch >= 2.4 from pip's index, if there is none).
# The package itself accepts any torch >= 2.4.
TORCH ?= torch==2.13.0
TORCH_INDEX ?=

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(if $(TORCH),,--system-site-packages) $(VENV)
	$(if $(TORCH),$(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) '$(TORCH)')
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/nin train $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples hubconf.py
	$(BIN)/ruff format --check src tests benchmarks examples hubconf.py

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks examples hubconf.py
	$(BIN)/ruff check --fix src tests benchmarks examples hubconf.py

benchmark: $(STAMP)
	$(BIN)/python benchmarks/cpu_default.py
	$(BIN)/python benchmarks/cpu_switches.py
	$(BIN)/python benchmarks/ceiling.py

# The GPU check (benchmarks/gpu_check.py): every CUDA path and every GPU figure in at most
# 8 minutes, written into docs/. SMOKE=1: the same steps with tiny sizes on any device (about a
# minute or so on a CPU; writes runs/gpu-check only). DATA_DIR=DIR: where the data sets are (default
# $NIN_DATA_DIR or ~/.cache/nin; never downloaded). NOVENV=1: run with $(PYTHON) and this
# checkout's src/ instead of setting up .venv (a GPU machine with torch and no package index).
gpu-check: $(if $(NOVENV),,$(STAMP))
	PYTHONPATH=src$${PYTHONPATH:+:$$PYTHONPATH} $(if $(NOVENV),$(PYTHON),$(BIN)/python) \
		benchmarks/gpu_check.py $(if $(SMOKE),--smoke) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(ARGS)

# The documentation site (MkDocs, mkdocs.yml) in build/site/: warnings are errors, so a broken
# link or a page missing from the nav fails. `$(BIN)/mkdocs serve` shows it while editing.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

clean:
	rm -rf $(VENV) runs build/site .pytest_cache .ruff_cache
