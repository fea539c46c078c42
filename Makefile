# Two entry points (see README): `make demo` and `make test`. Each installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rimlens-installed

.PHONY: demo test lint bench install clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test,bench]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=2 $(VENV)/bin/rimlens demo --out demo_output

# Static checks: ruff (lint + formatting) everywhere, mypy on the files named in pyproject.toml.
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks && $(VENV)/bin/ruff format --check src tests benchmarks && $(VENV)/bin/mypy

test: $(STAMP)
	$(MAKE) lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 -q --durations=12

bench: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) benchmarks/bench_simulator.py

clean:
	rm -rf $(VENV) demo_output
