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

# A real small study end to end (a few minutes on 2 cores): local Ray, an MLflow
# server on 127.0.0.1, Optuna in SQLite, the champion registered and pulled back.
demo: setup
	rm -rf runs/demo
	$(BIN)/rank1 study run studies/demo.yaml
	$(BIN)/rank1 pull demo-decomposed@champion --home runs/demo --out runs/demo/pulled
	@echo "Browse the study: $(BIN)/rank1 ui --home runs/demo   (then open http://127.0.0.1:5000)"

bench: setup
	$(BIN)/rank1 bench --out benchmarks/results

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
