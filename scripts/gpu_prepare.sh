#!/usr/bin/env bash
# Wheels for a GPU machine that has torch but neither diffusers nor specdiff_fx, and no network:
# diffusers (pure Python) and what it needs beyond that machine's packages, and this package
# built as a wheel (its entry point registers backend="specdiff"; a plain checkout on
# PYTHONPATH would not). They go to .whl/ (ignored by git). On the GPU machine, from the
# repository root, scripts/gpu_session.sh installs them and runs the measurements:
#
#   bash scripts/gpu_session.sh sd3 flux
#
# Python 3.12, manylinux x86_64 (what the lent H100/H200 machines run; change below if not).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/env.sh
rm -rf .whl && mkdir -p .whl
diffusers=$(.venv/bin/python -c "import diffusers; print(diffusers.__version__)")
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "diffusers==${diffusers}" importlib_metadata
.venv/bin/python -m pip wheel -q --no-deps --no-build-isolation . -w .whl
ls -l .whl
