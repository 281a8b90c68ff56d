# Quick start: `make demo` (set up + a real end-to-end run), `make test` (set up + tests).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# pytest-xdist workers: the real studies wait on processes and sockets part of the time, so two
# workers on two cores ran the whole suite 2.1x faster (895 s, was 1865 s); three were no faster
# (cold clean clones, 2026-12-03: 739 s against 729 s). TEST_WORKERS=0: one process.
# Groups and tests go to the workers longest first (tests/conftest.py orders them by their
# `slow(seconds=...)` estimates); --no-loadscope-reorder keeps xdist from re-sorting them by size.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder

.PHONY: setup system browser postgres test test-fast lint demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-compile -c constraints.txt -e '.[test]'
	@# Two things side by side: the installed modules byte-compiled on every core (pip compiles one
	@# file at a time: the install took 116 s with it, 80 s without), and the C++ CPU kernel, compiled
	@# once per machine (~24 s alone, one compiler process) now rather than in the first trial that
	@# deploys a model (which slowed that trial and the latency another one measured). Both together:
	@# 40 s (2-core Intel Xeon, 2026-12-04), so the setup is ~20 s shorter. The byte-compiling is
	@# not optional here: these machines set PYTHONDONTWRITEBYTECODE=1, so no import ever writes a
	@# .pyc, and without it every test process compiled torch, MLflow and Ray from source (a clean
	@# clone's pytest 995 s instead of 563 s, 2026-12-06; tried with the compile moved beside the
	@# install instead, ~30 s off the setup). The libraries' own test folders (3,458 of 19,741
	@# files; nothing here imports them) are left out: 43 s instead of 63 s (AMD EPYC, 2026-12-07).
	$(BIN)/python -m compileall -qq -j 0 -x '/tests?/' $(VENV)/lib >/dev/null 2>&1 & \
	$(BIN)/python -c "from rank1.kernels import cpp; r = cpp.unavailable_reason(); \
	  print(f'note: no C++ kernel here ({r}): the deployed form uses the library kernels') if r else cpp.build()" \
	  || echo "the C++ kernel could not be built (see above): the deployed form uses the library kernels"; \
	wait
	touch $(STAMP)

# What the tests need from the system, from Debian in one apt-get run: Chromium for the
# browser tests of the study report, PostgreSQL's server binaries for the shared-store tests
# (the tests start their own server on 127.0.0.1 as the `postgres` user; nothing runs as a
# system service). Needs root or sudo (CI runs as root); elsewhere those tests skip, except
# under CI=true, where the browser tests fail.
system:
	@need=; command -v chromium >/dev/null 2>&1 || need="$$need chromium"; \
	  command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need="$$need postgresql"; \
	  [ -z "$$need" ] || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; else SUDO=none; fi; \
	  if [ "$$SUDO" != none ] && command -v apt-get >/dev/null 2>&1; then \
	    $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$need >/dev/null \
	      || echo "could not install$$need: the tests that need it will skip"; \
	  else echo "no apt-get or root here: install$$need yourself, or the tests that need it will skip"; fi; }
browser postgres: system

# The environment and the system packages are set up side by side (pip and apt-get).
test:
	$(MAKE) --no-print-directory -j2 setup system
	$(BIN)/python -m ruff check rank1 study dashboards tests benchmarks
	$(PYTEST) --durations=25

# The inner loop: everything but the tests marked slow (real studies, clusters, browsers,
# compiler builds). `make test` (and CI) still runs them all.
test-fast: setup
	$(BIN)/python -m ruff check rank1 study dashboards tests benchmarks
	$(PYTEST) -m "not slow"

lint: setup
	$(BIN)/python -m ruff check rank1 study dashboards tests benchmarks

# A real small study end to end (a few minutes on 2 cores): local Ray, an MLflow
# server on 127.0.0.1, Optuna in SQLite, the champion registered and pulled back.
demo: setup
	rm -rf runs/demo
	$(BIN)/rank1 study run studies/demo.yaml
	$(BIN)/rank1 pull demo-decomposed@champion --home runs/demo --out runs/demo/pulled
	@echo "The report: runs/demo/report/report.html (opens offline)"
	@echo "Browse the study: $(BIN)/rank1 ui --home runs/demo   (then open http://127.0.0.1:5000)"

bench: setup
	$(BIN)/rank1 bench --out benchmarks/results

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
