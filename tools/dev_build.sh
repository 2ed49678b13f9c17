#!/usr/bin/env bash
# Developer build: compiles pyzeroq._core in place (src/pyzeroq/_core*.so) so that
# `PYTHONPATH=src python -m pytest` runs against the working tree.
# Usage: tools/dev_build.sh [build-dir] [extra cmake args...]
# OUTDIR=some/dir puts the .so there instead; then run with PYZEROQ_CORE_DIR=some/dir
# (src/pyzeroq/__init__.py searches that directory first for _core).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
BUILD=${1:-build/dev}; shift || true
"$PY" -m cmake --version >/dev/null 2>&1 || true
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$(command -v "$PY")" \
  -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PWD/${OUTDIR:-src/pyzeroq}" "$@" >/dev/null
cmake --build "$BUILD" -j 2
