#!/usr/bin/env bash
# The evaluation protocol (every zoo model x sampler x steps; specdiff and diffusers' caches vs
# full compute). Creates .venv on first use. Extra arguments go to benchmarks/protocol.py
# (e.g. --write, --tiny, --speed, --split heldout; --help lists them and the time estimate).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/env.sh
exec .venv/bin/python benchmarks/protocol.py "$@"
