#!/usr/bin/env bash
# Creates ./.venv (Python 3.11), installs the pinned requirements into it, then
# leo_suite itself, editable (pip install --no-deps -e .), so that scripts/*.py
# import this checkout's package. Idempotent: re-installs only when
# requirements*.txt or pyproject.toml changed. Set
# LEO_SUITE_REQUIREMENTS=requirements-gpu.txt on a CUDA machine.
set -euo pipefail
cd "$(dirname "$0")/.."
requirements="${LEO_SUITE_REQUIREMENTS:-requirements.txt}"
python_bin="${PYTHON:-}"
if [ -z "$python_bin" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      python_bin="$candidate"; break
    fi
  done
fi
if [ -z "$python_bin" ]; then
  echo "error: Python 3.11 not found (set PYTHON=/path/to/python3.11)" >&2
  exit 2
fi
if [ ! -x .venv/bin/python ]; then
  echo "[bootstrap] creating .venv with $python_bin"
  "$python_bin" -m venv .venv
fi
stamp=".venv/.requirements-$( (cat "$requirements" requirements-nodeps.txt pyproject.toml 2>/dev/null || true) | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[bootstrap] installing $requirements (first run takes a few minutes)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r "$requirements"
  if [ -f requirements-nodeps.txt ]; then
    # Packages whose declared dependencies would pull a second TensorFlow.
    .venv/bin/python -m pip install --quiet --no-deps -r requirements-nodeps.txt
  fi
  .venv/bin/python -m pip install --quiet --no-deps -e .
  rm -f .venv/.requirements-*
  touch "$stamp"
fi
