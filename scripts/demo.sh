#!/usr/bin/env bash
# The demo: eager vs Inductor vs specdiff on the shipped trained model; prints speed and
# fidelity, writes demo.png. Creates .venv on first use. Extra arguments go to the demo
# (e.g. --family flux).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/env.sh
exec .venv/bin/python -m specdiff_zoo.demo "$@"
