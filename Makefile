# The two commands: `make demo` and `make test`. Both set up what they need on a fresh machine
# with Python 3.11 or 3.12 and Node.js 22+ (Azurite's engines): a virtualenv in .venv and Azurite in node_modules.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP_PY := $(VENV)/.installed
STAMP_NODE := node_modules/.installed

.PHONY: setup browser demo test lint typecheck unit bench clean

setup: $(STAMP_PY) $(STAMP_NODE) browser

# Headless Chromium for the map-view browser tests (Debian's package; Playwright downloads nothing).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		$(SUDO) apt-get update && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y chromium; }

$(STAMP_PY): requirements.txt requirements-dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	@touch $@

$(STAMP_NODE): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@

lint: $(STAMP_PY)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports

typecheck: $(STAMP_PY)
	$(PY) -m mypy function_app.py functions shared_code tests

unit: setup
	$(PY) -m pytest tests/unit -q

test: setup lint typecheck
	$(PY) -m pytest -q -n 2 --durations=10

demo: setup
	$(PY) -m tests.demo

bench: setup
	$(PY) -m tests.bench

clean:
	rm -rf $(VENV) node_modules .mypy_cache .ruff_cache .pytest_cache
