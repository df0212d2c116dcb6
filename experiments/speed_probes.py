"""Where the time of a step goes: the probes behind docs/benchmarks.md's "What falls
short" (run on a quiet machine; ratios within one run).

  python experiments/speed_probes.py

Prints:
  * this CPU's matmul rate ([960, 640] x [640, 640], GFLOP/s) and ProtoNet's
    1-shot step in FLOP (TensorFlow's profiler on the step's graph), hence
    its arithmetic floor;
  * LEO (benchmark config, 12 one-shot tasks): adaptation with and without
    its random draws (training vs evaluation mode), the query logits with
    and without dropout, and Philox's rate for uniforms and normals;
  * the Trainer's whole step on cached episodes (no input pipeline), plain
    and XLA, for MAML and LEO, in tasks/s;
  * the episode sampler's wall and CPU time per meta-batch of 12 tasks.

  python experiments/speed_probes.py --evaluation=relation:5,matching:1 --passes=3

instead times repeated evaluation passes of those learners (2,000 fixed
tasks of the benchmark's test split, the path, XLA settings and test batch
the runner takes; gather batches of 25): per pass wall, CPU, system time and minor page
faults, which show a pass waiting (wall above CPU / cores) or faulting its
buffers in (system time).

  python experiments/speed_probes.py --orientation

times the table readout's product [R, D] x [D, Q] against [Q, D] x [D, R]
(TF's CPU matmul makes the wide product at about half the rate of its
transpose; XLA's both at one rate).
"""

import resource
import tempfile
import time

from leo_suite import console

tf = console.import_tensorflow()

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from leo_suite import errors  # pylint: disable=wrong-import-position
from leo_suite.bench import benchmark  # pylint: disable=wrong-import-position
from leo_suite.bench import timing  # pylint: disable=wrong-import-position
from leo_suite.bench import report as bench_report  # pylint: disable=wrong-import-position
from leo_suite.data import episodes  # pylint: disable=wrong-import-position
from leo_suite.models import base  # pylint: disable=wrong-import-position
from leo_suite.training import evaluation  # pylint: disable=wrong-import-position
from leo_suite.training import trainer as trainer_lib  # pylint: disable=wrong-import-position

flags.DEFINE_string("evaluation", "", "comma list of learner:shots: time evaluation passes only")
flags.DEFINE_integer("passes", 3, "passes per --evaluation entry")
flags.DEFINE_bool("orientation", False, "time the table readout's product both ways only")
flags.DEFINE_integer("table_finish_chunk_floats", 0, "override "
                     "evaluation.TABLE_FINISH_CHUNK_FLOATS (e.g. 16777216, the bound before "
                     "it had its own value)")
FLAGS = flags.FLAGS

BATCH = 12
SEED = tf.constant([0, 1])


def seconds_per_call(function, repeats=200):
  """Mean wall seconds of a traced `function()` (after one warm-up call)."""
  compiled = tf.function(function)
  compiled()
  start = time.perf_counter()
  for _ in range(repeats):
    out = compiled()
  tf.nest.map_structure(lambda t: t.numpy(), out)
  return (time.perf_counter() - start) / repeats


def matmul_and_protonet_floor(sampler):
  a, b = tf.random.normal([960, 640]), tf.random.normal([640, 640])
  rate = 2 * 960 * 640 * 640 / seconds_per_call(lambda: tf.matmul(a, b), 300) / 1e9
  learner = benchmark.build("protonet")
  episode = next(iter(sampler.dataset(0, BATCH)))
  graph = tf.function(lambda e, s: learner.loss_and_gradients(e, seed=s)).get_concrete_function(
      episode, SEED).graph
  options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
  options["output"] = "none"
  flop = tf.compat.v1.profiler.profile(graph=graph, options=options).total_float_ops
  print(f"matmul: {rate:.0f} GFLOP/s; ProtoNet 1-shot step: {flop / 1e9:.3f} GFLOP, "
        f"floor {1e3 * flop / (rate * 1e9):.1f} ms")


def leo_randomness(sampler):
  learner = benchmark.build("leo")
  e = next(iter(sampler.dataset(0, BATCH)))
  weights = tf.random.normal([BATCH, 5, 1, bench_report.DIM])
  adapt = lambda training: (lambda: learner._adapt(  # pylint: disable=protected-access
      e.support_x, e.support_y, training, base.SeedStream(SEED)))
  rows = {
      "adapt, training (weight samples, dropout)": adapt(True),
      "adapt, evaluation (means, no dropout)": adapt(False),
      "query logits with dropout": lambda: learner.logits(e.query_x, weights, True, SEED),
      "query logits without dropout": lambda: learner.logits(e.query_x, weights, False, SEED),
  }
  for name, function in rows.items():
    print(f"LEO {name}: {1e3 * seconds_per_call(function):.2f} ms")
  count = 1_000_000
  for name, draw in (("uniform", tf.random.stateless_uniform),
                     ("normal", tf.random.stateless_normal)):
    seconds = seconds_per_call(lambda draw=draw: draw([count], SEED, alg=base.RNG_ALG), 50)
    print(f"Philox {name}: {count / seconds / 1e6:.0f} million/s")


def cached_steps(split):
  for model in ("maml", "leo"):
    for shots in (1, 5):
      sampler = episodes.EpisodeSampler(split, episodes.EpisodeSpec(5, shots, 15))
      cached = list(sampler.dataset(0, BATCH).take(10))
      for jit in (False, True):
        with tempfile.TemporaryDirectory() as scratch:
          run = benchmark.make_run(model, scratch, num_tr_examples_per_class=shots,
                                   num_val_examples_per_class=15,
                                   metatrain_batch_size=BATCH, jit_compile=jit)
          trainer = trainer_lib.Trainer(run.build_learner(),
                                        trainer_lib.TrainConfig.from_run(run), sampler)
          steps = timing.time_steps(trainer._train_step,  # pylint: disable=protected-access
                                       iter(cached * 30), 150)
        print(f"{model} {shots}-shot step on cached episodes, {'XLA' if jit else 'plain'}: "
              f"{BATCH * steps:,.0f} tasks/s")


def matmul_orientation(rows=600, dim=640):
  """GFLOP/s of a class's rows [R, D] against Q weight rows [Q, D] as
  [R, D] x [D, Q] and as [Q, D] x [D, R] (the table readout's product)."""
  features = tf.random.normal([rows, dim])
  for width in (1024, 4096, 8192, 20480):
    weights = tf.random.normal([width, dim])
    flop = 2 * rows * dim * width
    for jit in (False, True):
      rates = [flop / seconds_per_call(tf.function(f, jit_compile=jit), 30) / 1e9 for f in (
          lambda: tf.matmul(features, weights, transpose_b=True),
          lambda: tf.matmul(weights, features, transpose_b=True))]
      print(f"[{rows}, {dim}] x [{dim}, {width}] {'XLA' if jit else 'plain'}: {rates[0]:.0f} "
            f"GFLOP/s; [{width}, {dim}] x [{dim}, {rows}]: {rates[1]:.0f} GFLOP/s", flush=True)


def sampler_cost(sampler, batches=400):
  iterator = iter(sampler.dataset(0, BATCH))
  next(iterator)
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(batches):
    next(iterator)
  print(f"sampler: {1e3 * (time.perf_counter() - wall) / batches:.2f} ms wall, "
        f"{1e3 * (time.process_time() - cpu) / batches:.2f} ms CPU per meta-batch of {BATCH}")


def evaluation_passes(model, shots, passes, num_tasks=2000, gather_batch=25):
  sampler = benchmark.eval_sampler(benchmark.eval_split(), shots)
  evaluator, _, _, table_batch = benchmark.runner_evaluator(model)
  method = evaluator.method(sampler)
  batch_size = table_batch if method == "table" else gather_batch
  evaluator.fixed_accuracy(sampler, 99, min(num_tasks, evaluation.TABLE_GROUP_TASKS), batch_size,
                           method=method)  # trace and compile a group's shapes
  for _ in range(passes):
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    evaluator.fixed_accuracy(sampler, 1, num_tasks, batch_size, method=method)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    print(f"{model} {shots}-shot evaluation ({method}): {num_tasks / wall:,.0f} tasks/s, "
          f"wall {wall:.2f} s, CPU {user + system:.2f} s (system {system:.2f}), "
          f"{after.ru_minflt - before.ru_minflt:,} minor page faults", flush=True)


def main(argv):
  del argv
  if FLAGS.table_finish_chunk_floats:
    evaluation.TABLE_FINISH_CHUNK_FLOATS = FLAGS.table_finish_chunk_floats
  if FLAGS.orientation:
    matmul_orientation()
    return
  if FLAGS.evaluation:
    for entry in FLAGS.evaluation.split(","):
      model, _, shots = entry.partition(":")
      if model not in bench_report.MODELS or not shots.isdigit():
        raise errors.ConfigError(f"--evaluation: {entry!r} is not learner:shots with a learner of "
                     f"{list(bench_report.MODELS)}")
      evaluation_passes(model, int(shots), FLAGS.passes)
    return
  split = benchmark.synthetic_split(64, bench_report.IMAGES_PER_CLASS, seed=0)
  sampler = episodes.EpisodeSampler(split, episodes.EpisodeSpec(5, 1, 15))
  matmul_and_protonet_floor(sampler)
  leo_randomness(sampler)
  cached_steps(split)
  sampler_cost(sampler)


if __name__ == "__main__":
  console.run(main)
