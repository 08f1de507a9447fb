# zsync: `make up` runs the whole local stack, `make test` the whole test suite.
# Both install what they need (venv, pip and npm packages) and need no running service.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP_STAMP := $(VENV)/.installed
NPM_STAMP := node_modules/.installed
PYTEST_ARGS ?=

.PHONY: install up test lint bench package clean help

help:
	@echo "make up       start the local stack (Postgres, Tables service, 7 functions, webhook sender, moto)"
	@echo "make test     run the whole test suite (installs first)"
	@echo "make lint     ruff"
	@echo "make bench    benchmarks under bench/"
	@echo "make package  npx osls package (the AWS deployment artifact, offline)"

$(PIP_STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

$(NPM_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

install: $(PIP_STAMP) $(NPM_STAMP)

up: install
	$(VENV)/bin/zsync up

test: install
	$(PY) -m pytest -n 2 --dist loadfile -q $(PYTEST_ARGS)

lint: $(PIP_STAMP)
	$(VENV)/bin/ruff check .

bench: $(PIP_STAMP)
	$(PY) -m bench

package: install
	SLS_TELEMETRY_DISABLED=1 SLS_NOTIFICATIONS_MODE=off npx osls package --stage dev

clean:
	rm -rf $(VENV) node_modules .serverless .pytest_cache .ruff_cache
