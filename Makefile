# Quick start: `make demo` (set up + a real end-to-end run), `make test` (set up + tests).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup test lint demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m ruff check rank1 study tests
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/python -m ruff check rank1 study tests

demo: setup
	$(BIN)/rank1 bench --smoke

bench: setup
	$(BIN)/rank1 bench --out benchmarks/results

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
