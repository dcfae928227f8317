#!/usr/bin/env bash
# The pytest-benchmark suite (eager vs Inductor vs specdiff, grouped). Creates .venv on first use.
# Extra arguments go to pytest, e.g. --benchmark-save=cpu to compare later runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/env.sh
exec .venv/bin/python -m pytest benchmarks/bench_speed.py -p no:cacheprovider --benchmark-group-by=group \
  --benchmark-columns=min,median,mean,rounds "$@"
