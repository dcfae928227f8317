#!/usr/bin/env bash
# The test suite (CPU). Creates .venv on first use. Extra arguments go to pytest.
# Two processes (pytest-xdist), one test file each at a time so that a file's shared compiled
# models stay in one process; SPECDIFF_TEST_WORKERS=0 runs everything in this process.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/env.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "${SPECDIFF_TEST_WORKERS:-2}" --dist loadfile "$@"
