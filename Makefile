# One entry for everything: `make run` (the main job) and `make test` (the whole suite).
# Both create and fill .venv when it is missing or older than pyproject.toml / constraints.txt.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CODE := ranger_ps server worker proto tests .ci

.PHONY: run test lint typecheck pytest proto clean

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "ranger-ps needs Python 3.11 or newer (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

## The main job: a local cluster (2 shards, 2 workers) trains an MLP on scikit-learn's digits;
## the report, the per-step CSVs and the plot land in runs/latest/.
RUN_DIR ?= runs/latest
run: $(STAMP)
	$(BIN)/ranger-ps local --report $(RUN_DIR)/report.json $(ARGS)

## The whole test suite: linter, formatter check, type checker, then pytest.
test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check $(CODE)
	$(BIN)/ruff format --check $(CODE)
	$(BIN)/python .ci/check_imports.py

typecheck: $(STAMP)
	$(BIN)/python .ci/typecheck.py ranger_ps tests

pytest: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## Regenerate ranger_ps/_proto from proto/ (tests fail when the committed copy differs).
proto: $(STAMP)
	$(BIN)/python proto/generate.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
