#!/usr/bin/env bash
# The fidelity ablation (token choice with exact compute; every option one at a time). Creates
# .venv on first use. Extra arguments go to benchmarks/ablation.py (e.g. --tiny).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/env.sh
exec .venv/bin/python benchmarks/ablation.py "$@"
