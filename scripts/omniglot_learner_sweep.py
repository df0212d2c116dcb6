"""Validation-only learner sweep on extracted Omniglot-small embeddings (issue 12).

Trains one learner at one setting with runner.py (train phase only: the test
split, Latin, is never scored) and records the best validation accuracy on the
meta-val alphabets and its step (best/best.json), plus the wall time.

  nice -n 10 .venv/bin/python scripts/omniglot_learner_sweep.py \
      --data_path=runs/sweep/x/embeddings --model=r2d2 --ways=20 --shots=1 \
      --steps=300 --tag=lr1e-3 -- --outer_lr=1e-3

Appends one JSON line to --log (default runs/sweep/learners.jsonl).
"""

import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from leo_suite.training import compare  # pylint: disable=wrong-import-position
from leo_suite.training import layout  # pylint: disable=wrong-import-position


def main():
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser()
  parser.add_argument("--data_path", required=True)
  parser.add_argument("--model", required=True)
  parser.add_argument("--ways", type=int, default=5)
  parser.add_argument("--shots", type=int, default=1)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--checkpoint_steps", type=int, default=100)
  parser.add_argument("--val_tasks", type=int, default=300)
  parser.add_argument("--tag", default="")
  parser.add_argument("--log", default="runs/sweep/learners.jsonl")
  parser.add_argument("--run_root", default="runs/sweep/learner_runs")
  parser.add_argument("extra", nargs="*")
  args = parser.parse_args()
  name = f"{args.model}_{args.ways}w{args.shots}s_{args.tag or 'default'}"
  run_dir = os.path.abspath(os.path.join(args.run_root, os.path.basename(
      os.path.dirname(os.path.abspath(args.data_path))), name))
  shutil.rmtree(run_dir, ignore_errors=True)
  cmd = [sys.executable, compare.RUNNER, f"--model={args.model}", f"--checkpoint_path={run_dir}",
         f"--data_path={os.path.abspath(args.data_path)}", "--dataset_name=omniglot_small",
         "--embedding_crop=center", f"--num_classes={args.ways}",
         f"--num_tr_examples_per_class={args.shots}", "--num_val_examples_per_class=15",
         "--eval_num_query=15", "--eval_seed=0", f"--num_steps_limit={args.steps}",
         f"--checkpoint_steps={args.checkpoint_steps}", f"--log_steps={args.checkpoint_steps}",
         "--num_val_batches=1", f"--metavalid_batch_size={args.val_tasks}", "--baselines=",
         *args.extra]
  started = time.time()
  code, tail, _ = compare._run(cmd, 3600)  # pylint: disable=protected-access
  record = {"model": args.model, "setting": f"{args.ways}w{args.shots}s", "tag": args.tag,
            "steps": args.steps, "extra": args.extra, "features": args.data_path,
            "seconds": round(time.time() - started, 1), "exit": code}
  info = layout.RunDirectory(run_dir).best_record() if code == 0 else None
  if info:
    record.update(best_step=info["step"], val=round(100 * info["val_accuracy"], 2))
  else:
    record["error"] = " | ".join(tail[-3:])[:400]
  with open(args.log, "a") as handle:
    handle.write(json.dumps(record) + "\n")
  print(json.dumps(record), flush=True)


if __name__ == "__main__":
  main()
