"""Throughput and memory of every learner on this machine, in one run.

  python scripts/benchmark.py --output=runs/benchmark.json
  python scripts/benchmark.py --only=leo,maml --quick
  python scripts/benchmark.py --markdown=runs/benchmark.json   # docs/benchmarks.md's table
  python scripts/benchmark.py --only=maml --profile_dir=runs/profile

What is measured, and issue 14's targets: leo_suite/bench/benchmark.py.
Embeddings are synthetic, so accuracies are meaningless here; the machine may
be shared: compare ratios measured in the same run.
"""

import json
import os

from leo_suite import console

console.import_tensorflow()   # no TensorFlow C++ start-up lines (--verbosity=1 shows them)

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from leo_suite import errors  # pylint: disable=wrong-import-position
from leo_suite import fileio  # pylint: disable=wrong-import-position
from leo_suite.bench import benchmark  # pylint: disable=wrong-import-position
from leo_suite.bench import report as bench_report  # pylint: disable=wrong-import-position

flags.DEFINE_string("only", ",".join(bench_report.MODELS), "comma list of learners")
flags.DEFINE_boolean("quick", False, "fewer steps/tasks (smoke run; figures are noisier)")
flags.DEFINE_string("output", "", "write the results as JSON here")
flags.DEFINE_string("skip", "", "comma list of sections to skip: train,xla,map_fn,eval,memory,"
                    "extraction,serving")
flags.DEFINE_integer("eval_tasks", 0, "tasks per learner in the evaluation benchmark (default "
                     "2000, quick 200); LEO 1-shot runs --leo_eval_tasks unless --quick")
flags.DEFINE_string("serving_export_dir", "", "an exported classifier version "
                    "(scripts/export_classifier.py) for the serving latency benchmark "
                    "(leo_suite.serving.latency.benchmark_latency)")
flags.DEFINE_integer("eval_batch_size", 25, "tasks per evaluation batch (V=600-K: 25 tasks = "
                     "190 MB)")
flags.DEFINE_integer("leo_eval_tasks", 10000, "LEO 1-shot evaluation tasks (the release's test "
                     "protocol)")
flags.DEFINE_string("profile_dir", "", "write a TensorBoard profile of the first --only "
                    "learner's 1-shot step here (10 steps after its timed window)")
flags.DEFINE_string("markdown", "", "print docs/benchmarks.md's speed table from a benchmark JSON "
                    "(written by --output) and exit; nothing is measured")
flags.DEFINE_string("recount_limits", "", "count the evaluation rows' FLOPs and limits of a "
                    "benchmark JSON again with the current counter, rewrite it and print "
                    "its table; nothing is timed")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise errors.ConfigError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.markdown:
    print(bench_report.markdown(bench_report.read_results(FLAGS.markdown)))
    return
  if FLAGS.recount_limits:
    results = benchmark.recount_limits(bench_report.read_results(FLAGS.recount_limits))
    fileio.atomic_write_text(FLAGS.recount_limits, json.dumps(results, indent=1, default=str))
    return print(bench_report.markdown(results))
  results = benchmark.run(
      [m for m in FLAGS.only.split(",") if m], quick=FLAGS.quick,
      skip=[s for s in FLAGS.skip.split(",") if s], eval_tasks=FLAGS.eval_tasks,
      eval_batch_size=FLAGS.eval_batch_size, leo_eval_tasks=FLAGS.leo_eval_tasks,
      profile_dir=FLAGS.profile_dir, serving_export_dir=FLAGS.serving_export_dir)
  bench_report.print_table(results)
  if FLAGS.output:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    fileio.atomic_write_text(FLAGS.output, json.dumps(results, indent=1, default=str))
    print(f"\nresults written to {FLAGS.output}")


if __name__ == "__main__":
  console.run(main)
