# The README's commands. `make demo` runs the main job on the embedded default;
# `make test` runs the test suite. Both set up .venv first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench lint clean toyworld toyworld-eval

setup:
	@bash scripts/setup_env.sh

demo: setup
	$(VENV)/bin/mossv-ros demo

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) bench/run_cpu.py

# Retrain the shipped toyworld model (CPU, about 14 minutes) and score it.
toyworld: setup
	$(VENV)/bin/mossv-ros toyworld train --out mossv_ros/data/toyworld --seed 1
	$(VENV)/bin/mossv-ros toyworld eval --json mossv_ros/data/toyworld/eval.json \
		--contact-sheet docs/toyworld_contact.png

toyworld-eval: setup
	$(VENV)/bin/mossv-ros toyworld eval --strict

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf build .pytest_cache .ruff_cache
