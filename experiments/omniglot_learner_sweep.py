"""Validation-only learner sweep on extracted Omniglot-small embeddings (issue 12).

Trains one learner at one setting with runner.py (train phase only: the test
split, Latin, is never scored) and records the best validation accuracy on the
meta-val alphabets and its step (best/best.json), plus the wall time.

  nice -n 10 .venv/bin/python experiments/omniglot_learner_sweep.py \
      --data_path=runs/sweep/x/embeddings --model=r2d2 --ways=20 --shots=1 \
      --steps=300 --tag=lr1e-3 -- --outer_lr=1e-3

Arguments after `--` go to runner.py. Appends one JSON line to --log (default
runs/sweep/learners.jsonl).
"""

import json
import os
import shutil
import sys
import time

from leo_suite import console

console.import_tensorflow()

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from leo_suite.training import compare  # pylint: disable=wrong-import-position
from leo_suite.training import layout  # pylint: disable=wrong-import-position

flags.DEFINE_string("data_path", None, "Embeddings root (<data_path>/omniglot_small/center/).")
flags.DEFINE_string("model", None, "runner.py --model.")
flags.DEFINE_integer("ways", 5, "Classes per episode.")
flags.DEFINE_integer("shots", 1, "Support examples per class.")
flags.DEFINE_integer("steps", 300, "Meta-training steps.")
flags.DEFINE_integer("checkpoint_steps", 100, "Validation (and logging) interval.")
flags.DEFINE_integer("val_tasks", 300, "Fixed meta-val tasks.")
flags.DEFINE_string("tag", "", "Names the run (default 'default').")
flags.DEFINE_string("log", "runs/sweep/learners.jsonl", "JSON-lines file the record goes to.")
flags.DEFINE_string("run_root", "runs/sweep/learner_runs", "Where the run directories go.")
FLAGS = flags.FLAGS


def main(argv):
  extra = argv[1:]
  name = f"{FLAGS.model}_{FLAGS.ways}w{FLAGS.shots}s_{FLAGS.tag or 'default'}"
  run_dir = os.path.abspath(os.path.join(FLAGS.run_root, os.path.basename(
      os.path.dirname(os.path.abspath(FLAGS.data_path))), name))
  shutil.rmtree(run_dir, ignore_errors=True)
  cmd = [sys.executable, compare.RUNNER, f"--model={FLAGS.model}",
         f"--checkpoint_path={run_dir}", f"--data_path={os.path.abspath(FLAGS.data_path)}",
         "--dataset_name=omniglot_small", "--embedding_crop=center",
         f"--num_classes={FLAGS.ways}", f"--num_tr_examples_per_class={FLAGS.shots}",
         "--num_val_examples_per_class=15", "--eval_num_query=15", "--eval_seed=0",
         f"--num_steps_limit={FLAGS.steps}", f"--checkpoint_steps={FLAGS.checkpoint_steps}",
         f"--log_steps={FLAGS.checkpoint_steps}", "--num_val_batches=1",
         f"--metavalid_batch_size={FLAGS.val_tasks}", "--baselines=", *extra]
  started = time.time()
  code, tail, _ = compare._run(cmd, 3600)  # pylint: disable=protected-access
  record = {"model": FLAGS.model, "setting": f"{FLAGS.ways}w{FLAGS.shots}s", "tag": FLAGS.tag,
            "steps": FLAGS.steps, "extra": extra, "features": FLAGS.data_path,
            "seconds": round(time.time() - started, 1), "exit": code}
  info = layout.RunDirectory(run_dir).best_record() if code == 0 else None
  if info:
    record.update(best_step=info["step"], val=round(100 * info["val_accuracy"], 2))
  else:
    record["error"] = " | ".join(tail[-3:])[:400]
  with open(FLAGS.log, "a") as handle:
    handle.write(json.dumps(record) + "\n")
  print(json.dumps(record), flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["data_path", "model"])
  console.run(main)
