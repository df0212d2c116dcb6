"""Adapts a trained run to your support set(s) and predicts your query images.

  # one task: support = class-per-folder images, query = a folder of images
  python scripts/predict.py --checkpoint_path=runs/omniglot_leo \
      --support=my_task/support --query=my_task/query --output=preds.csv

  # many tasks: tasks/<name>/{support,query}, with progress and mean accuracy +- 95% CI
  python scripts/predict.py --checkpoint_path=runs/omniglot_leo --tasks=tasks --output=preds.json

Support and query sets are a class-per-folder image tree (or .zip), a folder of
images with labels.csv (`file,label`), a `file,label` .csv, or an embeddings
.pkl/.npz (scripts/extract_embeddings.py). Queries may be unlabelled (a flat
folder, empty labels); with labels the accuracy is printed. The learner is
rebuilt from the run directory; images are embedded by --backbone_dir, else by
the backbone the run's data manifest names. Output: per query the file, its
label, the predicted class and the probability of every class, as CSV (to
stdout without --output) or JSON. See leo_suite/serving/predict.py.
"""

import sys

from leo_suite import console

console.import_tensorflow()   # no TensorFlow C++ start-up lines (--verbosity=1 shows them)

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from leo_suite import errors  # pylint: disable=wrong-import-position
from leo_suite.serving import predict  # pylint: disable=wrong-import-position

flags.DEFINE_string("checkpoint_path", None,
                    "Run directory of `runner.py` training: the learner is rebuilt from its "
                    "config.json and best (else latest) checkpoint.")
flags.DEFINE_string("support", None, "Support set: class-per-folder images, images + "
                    "labels.csv, a file,label .csv, or an embeddings .pkl/.npz.")
flags.DEFINE_string("query", None, "Query set, in any support form; labels are optional "
                    "(a flat folder of images has none).")
flags.DEFINE_string("tasks", None, "A folder of tasks: one sub-folder per task holding a "
                    "support and a query set (support/ or support.csv/.pkl/.npz/.zip).")
flags.DEFINE_string("backbone_dir", None, "The backbone/ folder of scripts/pretrain.py for "
                    "image sets (default: the one the run's data manifest names).")
flags.DEFINE_string("output", None, "preds.csv or preds.json (default: CSV on stdout).")
flags.DEFINE_integer("num_shots", 0, "Use the first K support examples of each class (0 = "
                     "all; then every class must have the same number).")
flags.DEFINE_integer("batch_size", 64, "Images per batch when embedding.")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise errors.ConfigError(f"unexpected arguments: {argv[1:]}")
  tasks = predict.plan(FLAGS.checkpoint_path, FLAGS.support, FLAGS.query, FLAGS.tasks,
                       FLAGS.output, FLAGS.batch_size)
  predictor = predict.Predictor(FLAGS.checkpoint_path, FLAGS.backbone_dir, FLAGS.num_shots,
                                FLAGS.batch_size)
  report = sys.stdout if FLAGS.output else sys.stderr

  def log(line):
    print(line, file=sys.stderr, flush=True)
  results = predictor.predict_tasks(tasks, log)
  if FLAGS.output:
    predict.write_output(FLAGS.output, results, predictor.description())
  else:
    predict.write_stdout(results)
  for line in predict.report_lines(results):
    print(line, file=report)
  if FLAGS.output:
    print(f"wrote {len(results)} task(s), {sum(len(r.files) for r in results)} predictions "
          f"-> {FLAGS.output}")


if __name__ == "__main__":
  console.run(main, where=lambda: FLAGS.output, location_flag="--output",
              recovery="No output was written (it is written whole, at the end).",
              interrupted="interrupted; no output was written")
