# The README's commands. `make demo` runs the main job on the embedded default;
# `make test` runs the test suite. Both set up .venv first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-jazzy bench lint clean toyworld toyworld-eval
# The ROS tests run again on the Jazzy wheels (rclpy 7.x): node, executor, faults, bags,
# toyworld through ROS, launch, ros2 CLI, colcon, the hostile suite, action/diagnostics/overlay.
JAZZY_TESTS = test/test_ros.py test/test_executor.py test/test_faults.py test/test_bag_e2e.py \
	test/test_status_ros.py \
	test/test_toyworld_ros.py test/test_launch.py test/test_ros2_cli.py test/test_colcon.py \
	test/test_hostile_ros.py test/test_robot_interfaces.py test/test_cameras_ros.py

setup:
	@bash scripts/setup_env.sh

demo: setup
	$(VENV)/bin/mossv-ros demo

test: setup
	$(PY) -m pytest

# The same ROS tests on ROS 2 Jazzy (a second venv, .venv-jazzy); CI runs it after `make test`.
test-jazzy:
	@MOSSV_ROS_DISTRO=jazzy bash scripts/setup_env.sh
	.venv-jazzy/bin/python -m pytest $(JAZZY_TESTS)

bench: setup
	$(PY) bench/run_cpu.py
	$(PY) bench/bench_sessions.py

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
