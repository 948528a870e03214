# The README's commands. `make demo` runs the main job on the embedded default;
# `make test` runs the test suite. Both set up .venv first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench lint clean

setup:
	@bash scripts/setup_env.sh

demo: setup
	$(VENV)/bin/mossv-ros demo

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) bench/run_cpu.py

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf build .pytest_cache .ruff_cache
