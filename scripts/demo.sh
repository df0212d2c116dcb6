#!/usr/bin/env bash
# One command from a fresh clone: set up .venv, meta-train LEO on the embedded
# synthetic dataset, then evaluate it against nearest-class-mean on the same
# fixed test episodes. Extra arguments go to both runner calls.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
run_dir="${LEO_SUITE_DEMO_DIR:-runs/demo}"
.venv/bin/python runner.py --preset=demo --checkpoint_path="$run_dir" "$@"
.venv/bin/python runner.py --preset=demo --checkpoint_path="$run_dir" --evaluation_mode \
  --baselines=ncm,logreg "$@"
