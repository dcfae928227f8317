#!/usr/bin/env bash
# The test suite (CPU). Creates .venv on first use. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/env.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
