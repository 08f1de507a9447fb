# zsync: `make up` runs the whole local stack, `make test` the whole test suite.
# Both install what they need (venv, pip and npm packages) and need no running service.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP_STAMP := $(VENV)/.installed
NPM_STAMP := node_modules/.installed
PYTEST_ARGS ?=
# make up's ports: the Tables API on PORT_BASE, the seven functions on the next seven, moto on +9; 0: free ports
PORT_BASE ?= 8700

.PHONY: install chromium up test lint bench soak package clean help

help:
	@echo "make up       start the local stack (Postgres, Tables service, 7 functions, webhook sender, moto)"
	@echo "              on ports 8700-8709; PORT_BASE=8800 for others, PORT_BASE=0 for free ones"
	@echo "make test     run the whole test suite (installs first)"
	@echo "make lint     ruff"
	@echo "make bench    benchmarks under bench/"
	@echo "make soak     50,000 changes both ways under chaos (SOAK_CHANGES=N SOAK_SEED=S to reproduce)"
	@echo "make package  npx osls package (the AWS deployment artifact; no AWS account, but pip needs PyPI)"

$(PIP_STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	# compat: the repository path in a .pth instead of setuptools' import-hook finder, which costs every
	# Python process 10-20 ms at start (a function's cold start included). Plain -e where it is gone.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --config-settings editable_mode=compat -e . \
	  2>/dev/null || $(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

$(NPM_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

# Headless Chromium for the HTML report test (tests/test_status_report.py). Idempotent; where apt cannot
# install it (no root, no Debian) the build goes on and that one test is skipped.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo -n ); \
	    ( $$SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || \
	      { $$SUDO apt-get update -q >/dev/null 2>&1 && \
	        $$SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; } ) || \
	    echo "chromium could not be installed: the report's browser test will be skipped"; }

install: $(PIP_STAMP) $(NPM_STAMP) chromium

up: install
	$(VENV)/bin/zsync up --port-base $(PORT_BASE)

test: install
	$(PY) -m pytest -n 2 --dist loadfile -q $(PYTEST_ARGS)

lint: $(PIP_STAMP)
	$(VENV)/bin/ruff check .

bench: $(PIP_STAMP)
	$(PY) -m bench

SOAK_CHANGES ?= 50000
SOAK_SEED ?=
soak: $(PIP_STAMP)
	$(PY) -m bench.soak --changes $(SOAK_CHANGES) $(if $(SOAK_SEED),--seed $(SOAK_SEED))

package: install
	SLS_TELEMETRY_DISABLED=1 SLS_NOTIFICATIONS_MODE=off npx osls package --stage dev

clean:
	rm -rf $(VENV) node_modules .serverless .pytest_cache .ruff_cache
