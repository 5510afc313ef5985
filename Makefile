# One-command set-up: `make demo` and `make test` create .venv, install pinned
# dependencies, build the extension in place, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
BUILD_STAMP := $(VENV)/.built

.PHONY: install build demo test test-cuda quality bench clean

$(STAMP): requirements.txt setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt
	touch $(STAMP)

install: $(STAMP)

$(BUILD_STAMP): $(STAMP) $(wildcard csrc/*) setup.py
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $(BUILD_STAMP)

build: $(BUILD_STAMP)

demo: build
	$(PY) -m icons_fast demo --out runs/demo

test: build
	$(PY) -m pytest -m "not cuda" -q tests

test-cuda: build
	$(PY) -m pytest -m cuda -q tests

quality: build
	$(PY) benchmarks/quality.py --seeds 0 1 2 --out runs/quality

bench: build
	$(PY) -m icons_fast bench --quick

clean:
	rm -rf $(VENV) build *.egg-info icons_fast/*.so runs
