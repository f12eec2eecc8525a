# Two commands a newcomer needs: `make train` and `make test`. Both set up .venv first (once).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup train test lint format benchmark clean

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

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
