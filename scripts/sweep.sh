#!/usr/bin/env bash
# The speed/fidelity sweep (specdiff vs diffusers' caches on the trained model). Creates .venv on
# first use. Extra arguments go to benchmarks/sweep.py (e.g. --write, --tiny).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/env.sh
exec .venv/bin/python benchmarks/sweep.py "$@"
