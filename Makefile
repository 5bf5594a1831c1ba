# Two commands set everything up from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit mutants test-compat bench clean

$(STAMP): pyproject.toml requirements/dev.txt requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c requirements/constraints.txt -r requirements/dev.txt
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/torchkeep demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks scripts examples
	$(VENV)/bin/ruff format --check src tests benchmarks scripts examples

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(PY) -m pytest -q

test: lint typecheck unit

# Each promise broken on purpose in a copy of src/ must fail its tests (tests/mutations.toml).
mutants: $(STAMP)
	$(PY) scripts/mutants.py

# The whole suite under the oldest and the newest supported torch, each in its own venv cached in
# ~/.cache/torchkeep/compat (scripts/test_compat.sh; requirements/compat-torch-*.txt pin each).
COMPAT_TORCH ?= 2.4.1 2.15.0
test-compat:
	scripts/test_compat.sh $(COMPAT_TORCH)

bench: $(STAMP)
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) build .mypy_cache .pytest_cache .ruff_cache
