#!/usr/bin/env bash
# Create (once) and activate the project's virtual environment in .venv.
# torch==2.13.0 is the CPU wheel on disk here; a plain `torch` requirement would pull
# a multi-GB CUDA build, so torch is installed first, pinned.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import specdiff_fx, pytest, hypothesis, pytest_benchmark, peft, xdist" 2>/dev/null; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[test]"
fi
