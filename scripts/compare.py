"""Train and evaluate all learners on the same fixed test episodes; one table.

  python scripts/compare.py                                  # embedded synthetic data
  python scripts/compare.py --data_path=embeddings --dataset_name=miniImageNet --steps=100000

Writes <out_dir>/comparison.md and comparison.json. Per-model flags:
  --model_flags='maml=--maml_hidden_sizes=64 --jit_compile;r2d2=--r2d2_projection_dim=32'
"""

import json
import os

from leo_suite import console

console.import_tensorflow()   # no TensorFlow C++ start-up lines (--verbosity=1 shows them)

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from leo_suite import fileio  # pylint: disable=wrong-import-position
from leo_suite.models import registry  # pylint: disable=wrong-import-position
from leo_suite.training import compare  # pylint: disable=wrong-import-position

flags.DEFINE_string("models", ",".join(registry.LEARNERS), "Learners to compare.")
flags.DEFINE_string("data_path", os.path.join(compare.REPO_ROOT, "embeddings"), "Embeddings root.")
flags.DEFINE_string("dataset_name", "synthetic", "Dataset under data_path.")
flags.DEFINE_integer("num_classes", 5, "N.")
flags.DEFINE_integer("num_shots", 1, "K.")
flags.DEFINE_integer("steps", 1500, "Meta-training steps per learner.")
flags.DEFINE_integer("num_test_tasks", 1000, "Fixed test tasks (the same for every learner).")
flags.DEFINE_float("outer_lr", 0.0, "Outer learning rate for every learner (0 = each "
                   "learner's own default, its reference code's).")
flags.DEFINE_string("model_flags", "maml=--maml_hidden_sizes=64;imaml=--imaml_hidden_sizes=64;"
                    "r2d2=--r2d2_projection_dim=32",
                    "Extra runner flags per model: 'model=--a --b;model2=--c'.")
flags.DEFINE_string("extra_flags", "", "Runner flags for every model (space separated).")
flags.DEFINE_string("out_dir", os.path.join(compare.REPO_ROOT, "runs", "compare"), "Output directory.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  per_model = {}
  for item in filter(None, FLAGS.model_flags.split(";")):
    name, _, extra = item.partition("=")
    per_model[name.strip()] = extra.split()
  setting = f"{FLAGS.num_classes}w{FLAGS.num_shots}s"
  common = [f"--data_path={FLAGS.data_path}", f"--dataset_name={FLAGS.dataset_name}",
            f"--num_classes={FLAGS.num_classes}", f"--num_tr_examples_per_class={FLAGS.num_shots}",
            f"--num_steps_limit={FLAGS.steps}", f"--checkpoint_steps={max(1, FLAGS.steps // 3)}",
            f"--num_test_tasks={FLAGS.num_test_tasks}", "--metatest_batch_size=100",
            "--metavalid_batch_size=100", "--num_val_batches=2",
            *([f"--outer_lr={FLAGS.outer_lr}"] if FLAGS.outer_lr > 0 else []),
            f"--log_steps={max(1, FLAGS.steps // 10)}", "--baselines=ncm,logreg",
            *FLAGS.extra_flags.split()]
  rows = []
  for model in filter(None, FLAGS.models.split(",")):
    run_dir = os.path.join(FLAGS.out_dir, f"{model}_{setting}")
    print(f"[compare] {model}: training {FLAGS.steps} steps into {run_dir}", flush=True)
    row = compare.run_learner(model, run_dir, common + per_model.get(model, []))
    row["flags"] = per_model.get(model, [])
    rows.append(row)
    print(f"[compare] {model}: {row.get('accuracy', row.get('status'))}", flush=True)
  table = compare.markdown_table(rows, f"{FLAGS.dataset_name}, {setting}, {FLAGS.steps} steps, "
                                 f"{FLAGS.num_test_tasks} fixed test tasks")
  fileio.atomic_write_text(os.path.join(FLAGS.out_dir, "comparison.md"), table)
  fileio.atomic_write_text(os.path.join(FLAGS.out_dir, "comparison.json"),
                           json.dumps(rows, indent=1))
  print(table)


if __name__ == "__main__":
  console.run(main)
