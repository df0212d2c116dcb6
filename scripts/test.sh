#!/usr/bin/env bash
# One command from a fresh clone: set up .venv and run the whole test suite
# (CI runs exactly this). Pass pytest arguments through, e.g.
#   bash scripts/test.sh -m "not integration and not slow"   # quick local loop
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec .venv/bin/python -m pytest -q "$@"
