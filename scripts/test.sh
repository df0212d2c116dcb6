#!/usr/bin/env bash
# One command from a fresh clone: set up .venv and run the whole test suite
# (CI runs exactly this) on 2 pytest-xdist workers, one test file per worker at
# a time (module fixtures are built once), longest first in the order
# tests/conftest.py sets (--no-loadscope-reorder keeps it: xdist would otherwise
# hand out the files with the most tests first), with the 20 slowest tests at the end.
# Pass pytest arguments through; later ones win, e.g.
#   bash scripts/test.sh -m "not integration and not slow"   # quick local loop
#   bash scripts/test.sh -n 0 tests/test_leo.py              # one process, no xdist
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec .venv/bin/python -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder \
  --durations=20 "$@"
