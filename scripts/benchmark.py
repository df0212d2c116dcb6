"""Throughput and memory of every learner on this machine, in one run.

  python scripts/benchmark.py --output=runs/benchmark.json
  python scripts/benchmark.py --only=leo,maml --quick

For each learner (5-way, meta-batch 12, D = 640, V = 15 queries per class in
meta-training):
  * meta-train steps/s and tasks/s at 1-shot and 5-shot (the Trainer's step:
    loss and gradients, NaN guard, clipping, Adam; episodes from the real
    EpisodeSampler pipeline), without and with XLA (jit_compile);
  * the same step written per task with tf.map_fn (each task a B = 1
    meta-batch, same maths, gradients averaged) and the batched/map_fn ratio;
  * evaluation tasks/s on the fixed-set path (real EpisodeSampler: gather +
    L2-normalise; V = 600 - K queries per class, as LEO's test protocol),
    for LEO also the time of 10,000 test tasks;
  * peak memory of one meta-training step (resident-set high-water mark
    increase, measured in a fresh subprocess per configuration), and for MAML
    and iMAML against the number of inner steps (1, 5, 10, 20).
Also embedding extraction (Conv-4 28x28, ResNet-12 84x84) and, if the serving
module provides `benchmark_latency`, serving latency. Embeddings are synthetic
(random, unit-norm after the sampler), so accuracies are meaningless here.
The machine may be shared: compare ratios measured in the same run.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from leo_suite import fileio  # pylint: disable=g-import-not-at-top
from leo_suite.data import embeddings  # pylint: disable=g-import-not-at-top
from leo_suite.data import episodes  # pylint: disable=g-import-not-at-top
from leo_suite.models import base  # pylint: disable=g-import-not-at-top
from leo_suite.models import registry  # pylint: disable=g-import-not-at-top
from leo_suite.training import evaluation  # pylint: disable=g-import-not-at-top
from leo_suite.training import run as run_lib  # pylint: disable=g-import-not-at-top
from leo_suite.training import trainer as trainer_lib  # pylint: disable=g-import-not-at-top

MODELS = tuple(registry.LEARNERS)
NUM_WAYS, DIM, BATCH, TRAIN_QUERIES, IMAGES_PER_CLASS = 5, 640, 12, 15, 600
MEMORY_INNER_STEPS = (1, 5, 10, 20)
TARGETS = {  # issue 6, this 2-core CPU
    ("leo", 1): 20.0, ("leo", 5): 8.0,                     # steps/s
    ("maml", 1): 1500.0 / BATCH,                            # 1,500 tasks/s
}


def synthetic_split(num_classes, images_per_class, dim=DIM, seed=0):
  """Random embeddings in LEO's layout (classes contiguous)."""
  rng = np.random.default_rng(seed)
  table = rng.standard_normal((num_classes * images_per_class, dim), dtype=np.float32)
  counts = np.full(num_classes, images_per_class, np.int64)
  return embeddings.EmbeddingSplit(
      table, [f"c{i}" for i in range(num_classes)],
      np.arange(num_classes, dtype=np.int64) * images_per_class, counts,
      [f"i{i}" for i in range(len(table))], {})


def make_run(model, directory, overrides=None, **settings):
  """A run (not written to disk) of `model` with its defaults and `settings`."""
  module = registry.learner_module(model)
  settings = run_lib.default_settings(model, module.Config(**(overrides or {})),
                                      num_classes=NUM_WAYS, **settings)
  return run_lib.Run.new(directory, settings, DIM, data={})


def build(model, overrides=None):
  return make_run(model, "", overrides).build_learner()


def map_fn_step(trainer):
  """The Trainer's step with the learner applied task by task (tf.map_fn)."""
  learner = trainer.learner
  variables = learner.trainable_variables

  def step(episode, seed):
    def one_task(task):
      single = base.Episode(*[t[tf.newaxis] for t in task])
      loss, grads, _ = learner.loss_and_gradients(single, seed=seed)
      return loss, tuple(grads)
    signature = (tf.TensorSpec([], learner.dtype),
                 tuple(tf.TensorSpec(v.shape, v.dtype) for v in variables))
    losses, grads = tf.map_fn(one_task, tuple(episode), fn_output_signature=signature)
    grads = [tf.reduce_mean(g, axis=0) for g in grads]
    return trainer._apply(tf.reduce_mean(losses), grads, {})  # pylint: disable=protected-access

  return tf.function(step)


def time_steps(step_fn, dataset_iter, num_steps, warmup=2):
  for i in range(warmup):
    out = step_fn(next(dataset_iter), tf.constant([0, i], tf.int32))
  tf.nest.map_structure(lambda t: t.numpy(), out)
  start = time.perf_counter()
  for i in range(num_steps):
    out = step_fn(next(dataset_iter), tf.constant([0, warmup + i], tf.int32))
  tf.nest.map_structure(lambda t: t.numpy(), out)
  return num_steps / (time.perf_counter() - start)


def train_throughput(model, shots, train_split, num_steps, with_map_fn=True, with_xla=True):
  spec = episodes.EpisodeSpec(NUM_WAYS, shots, TRAIN_QUERIES)
  sampler = episodes.EpisodeSampler(train_split, spec)
  row = {}
  variants = [("batched", False)] + ([("xla", True)] if with_xla else [])
  for name, jit in variants:
    with tempfile.TemporaryDirectory() as scratch:
      run = make_run(model, scratch, num_tr_examples_per_class=shots,
                     num_val_examples_per_class=TRAIN_QUERIES,
                     metatrain_batch_size=BATCH, jit_compile=jit)
      trainer = trainer_lib.Trainer(run.build_learner(), trainer_lib.TrainConfig.from_run(run),
                                    sampler)
      data = iter(sampler.dataset(0, BATCH))
      try:
        row[name] = time_steps(trainer._train_step, data, num_steps)  # pylint: disable=protected-access
      except Exception as exc:  # pylint: disable=broad-except
        row[name] = None
        row[name + "_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
      if name == "batched" and with_map_fn:
        row["map_fn"] = time_steps(map_fn_step(trainer), data, max(2, num_steps // 4), warmup=1)
  return row


def eval_throughput(model, shots, test_split, num_tasks, batch_size=200, jit=False):
  queries = IMAGES_PER_CLASS - shots
  sampler = episodes.EpisodeSampler(test_split, episodes.EpisodeSpec(NUM_WAYS, shots, queries))
  evaluator = evaluation.Evaluator(build(model), jit_compile=jit)
  evaluator.per_task_accuracy(sampler.fixed_set(99, batch_size, batch_size))  # trace
  start = time.perf_counter()
  accuracies = evaluator.per_task_accuracy(sampler.fixed_set(1, num_tasks, batch_size))
  seconds = time.perf_counter() - start
  assert len(accuracies) == num_tasks
  return {"tasks": num_tasks, "queries_per_class": queries, "seconds": seconds,
          "tasks_per_s": num_tasks / seconds}


def sampler_only(shots, test_split, num_tasks, batch_size=200):
  """Seconds to draw `num_tasks` evaluation tasks (gather + L2-normalise) alone."""
  sampler = episodes.EpisodeSampler(
      test_split, episodes.EpisodeSpec(NUM_WAYS, shots, IMAGES_PER_CLASS - shots))
  start = time.perf_counter()
  for _ in sampler.fixed_set(1, num_tasks, batch_size):
    pass
  return time.perf_counter() - start


# -- peak memory, one fresh process per configuration --------------------------
def memory_probe(model, shots, inner_steps):
  """Runs in a subprocess: RSS high-water increase (MB) of 3 meta-training steps."""
  overrides = {}
  if inner_steps is not None:
    overrides = {"inner_steps": inner_steps}
    if model == "leo":
      overrides = {"inner_unroll_length": inner_steps}
  learner = build(model, overrides)
  rng = np.random.default_rng(0)
  def tensor(shape):
    x = rng.standard_normal(shape).astype(np.float32)
    return tf.constant(x / np.linalg.norm(x, axis=-1, keepdims=True))
  labels = lambda m: tf.constant(np.tile(np.arange(NUM_WAYS)[:, None], [BATCH, 1, m])
                                 .reshape(BATCH, NUM_WAYS, m).astype(np.int32))
  episode = base.Episode(tensor([BATCH, NUM_WAYS, shots, DIM]), labels(shots),
                         tensor([BATCH, NUM_WAYS, TRAIN_QUERIES, DIM]), labels(TRAIN_QUERIES))

  @tf.function
  def step(seed):
    loss, grads, _ = learner.loss_and_gradients(episode, seed=seed)
    return loss, grads

  step.get_concrete_function(tf.TensorSpec([2], tf.int32))  # trace outside the window
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  for i in range(3):
    tf.nest.map_structure(lambda t: t.numpy(), step(tf.constant([0, i], tf.int32)))
  after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  gpu = None
  if tf.config.list_physical_devices("GPU"):
    gpu = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
  return {"peak_rss_increase_mb": (after - before) / 1024.0, "peak_rss_mb": after / 1024.0,
          "gpu_peak_mb": gpu}


def run_memory_probe(model, shots, inner_steps=None, timeout=600):
  args = [sys.executable, os.path.abspath(__file__), "--memory_probe",
          f"{model}:{shots}:{inner_steps if inner_steps is not None else ''}"]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
  if proc.returncode != 0:
    return {"error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the report ---------------------------------------------------------------------
def fmt(value, spec=".1f"):
  return "-" if value is None else format(value, spec)


def print_table(results):
  print("\n== meta-training (5-way, meta-batch 12, D=640, V=15; steps/s, tasks/s = 12x) ==")
  print(f"{'learner':8s} {'K':>2s} {'steps/s':>8s} {'tasks/s':>8s} {'XLA st/s':>8s} "
        f"{'map_fn st/s':>11s} {'batched/map_fn':>14s} {'XLA/plain':>9s} {'target':>8s}")
  for model, per_model in results["train"].items():
    for shots, row in per_model.items():
      ratio = row["batched"] / row["map_fn"] if row.get("map_fn") and row.get("batched") else None
      xla = row["xla"] / row["batched"] if row.get("xla") and row.get("batched") else None
      target = TARGETS.get((model, int(shots)))
      print(f"{model:8s} {shots:>2s} {fmt(row.get('batched')):>8s} "
            f"{fmt(row['batched'] * BATCH if row.get('batched') else None, '.0f'):>8s} "
            f"{fmt(row.get('xla')):>8s} {fmt(row.get('map_fn'), '.2f'):>11s} "
            f"{fmt(ratio, '.1f'):>14s} {fmt(xla, '.2f'):>9s} {fmt(target):>8s}")
  if results.get("eval"):
    print("\n== evaluation (fixed set via EpisodeSampler, V = 600-K queries/class) ==")
    for model, per_model in results["eval"].items():
      for shots, row in per_model.items():
        if "error" in row:
          print(f"{model:8s} K={shots}: error {row['error']}")
          continue
        print(f"{model:8s} K={shots}: {row['tasks_per_s']:8.1f} tasks/s "
              f"({row['tasks']} tasks in {row['seconds']:.1f} s)")
    for shots, seconds in results.get("sampler_seconds", {}).items():
      print(f"sampler alone K={shots}: {seconds['seconds']:.1f} s for {seconds['tasks']} tasks")
  if results.get("memory"):
    print("\n== peak memory of a meta-training step (RSS high-water increase, MB) ==")
    for key, row in results["memory"].items():
      print(f"{key:24s} {fmt(row.get('peak_rss_increase_mb')):>8s} MB"
            + (f"  error: {row['error']}" if "error" in row else ""))
  for key in ("extraction", "serving"):
    if results.get(key):
      print(f"\n== {key} ==")
      for name, value in results[key].items():
        print(f"{name:32s} {value}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", default=",".join(MODELS), help="comma list of learners")
  parser.add_argument("--quick", action="store_true",
                      help="fewer steps/tasks (smoke run; figures are noisier)")
  parser.add_argument("--output", default="", help="write the results as JSON here")
  parser.add_argument("--skip", default="",
                      help="comma list of sections to skip: train,xla,map_fn,eval,memory,"
                           "extraction,serving")
  parser.add_argument("--eval_tasks", type=int, default=0,
                      help="tasks per learner in the evaluation benchmark (default 2000, "
                           "quick 200); LEO 1-shot runs --leo_eval_tasks unless --quick")
  parser.add_argument("--serving_export_dir", default="",
                      help="an exported classifier version (scripts/export) for the serving "
                           "latency benchmark (leo_suite.serving.export.benchmark_latency)")
  parser.add_argument("--eval_batch_size", type=int, default=25,
                      help="tasks per evaluation batch (V=600-K: 25 tasks = 190 MB)")
  parser.add_argument("--leo_eval_tasks", type=int, default=10000,
                      help="LEO 1-shot evaluation tasks (the release's test protocol)")
  parser.add_argument("--memory_probe", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.memory_probe:
    model, shots, steps = args.memory_probe.split(":")
    print(json.dumps(memory_probe(model, int(shots), int(steps) if steps else None)))
    return

  models = [m for m in args.only.split(",") if m]
  unknown = [m for m in models if m not in MODELS]
  if unknown:
    parser.error(f"--only: unknown learner(s) {unknown}; choose from {list(MODELS)}")
  skip = set(s for s in args.skip.split(",") if s)
  num_steps = 10 if args.quick else 40
  eval_tasks = args.eval_tasks or (200 if args.quick else 2000)
  results = {"machine": {"cpus": os.cpu_count(), "tf": tf.__version__,
                         "gpus": len(tf.config.list_physical_devices("GPU")),
                         "load_average": os.getloadavg()},
             "settings": {"num_ways": NUM_WAYS, "dim": DIM, "meta_batch": BATCH,
                          "train_queries": TRAIN_QUERIES, "steps_timed": num_steps,
                          "quick": args.quick},
             "train": {}, "eval": {}, "memory": {}}
  start = time.time()
  train_split = synthetic_split(64, 40)
  for model in (models if "train" not in skip else []):
    results["train"][model] = {}
    for shots in (1, 5):
      row = train_throughput(model, shots, train_split, num_steps,
                             with_map_fn="map_fn" not in skip, with_xla="xla" not in skip)
      results["train"][model][str(shots)] = row
      print(f"[{time.time() - start:6.0f}s] train {model} {shots}-shot: "
            f"{json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()})}",
            flush=True)

  if "eval" not in skip:
    test_split = synthetic_split(20, IMAGES_PER_CLASS, seed=1)
    results["sampler_seconds"] = {}
    for shots in (1, 5):
      results["sampler_seconds"][str(shots)] = {
          "tasks": eval_tasks,
          "seconds": sampler_only(shots, test_split, eval_tasks, args.eval_batch_size)}
    for model in models:
      results["eval"][model] = {}
      for shots in (1, 5):
        tasks = (args.leo_eval_tasks if (model == "leo" and shots == 1 and not args.quick)
                 else eval_tasks)
        try:
          row = eval_throughput(model, shots, test_split, tasks, args.eval_batch_size)
        except Exception as exc:  # pylint: disable=broad-except
          row = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        results["eval"][model][str(shots)] = row
        print(f"[{time.time() - start:6.0f}s] eval {model} {shots}-shot: {row}", flush=True)

  if "memory" not in skip:
    for model in models:
      results["memory"][f"{model} 5-shot default"] = run_memory_probe(model, 5)
    for model in [m for m in ("maml", "imaml") if m in models]:
      for steps in MEMORY_INNER_STEPS:
        results["memory"][f"{model} 5-shot T={steps}"] = run_memory_probe(model, 5, steps)
    print(f"[{time.time() - start:6.0f}s] memory: {results['memory']}", flush=True)

  if "extraction" not in skip:
    from leo_suite.pretrain import extract  # pylint: disable=g-import-not-at-top
    results["extraction"] = {}
    for backbone, size, channels, count in (("conv4", 28, 1, 2048), ("resnet12", 84, 3, 256)):
      count = count // 4 if args.quick else count
      try:
        rate = extract.benchmark_extraction(backbone, size, channels, batch_size=64,
                                            num_images=count)
        results["extraction"][f"{backbone} {size}x{size} images/s"] = round(rate, 1)
      except Exception as exc:  # pylint: disable=broad-except
        results["extraction"][f"{backbone} {size}x{size} images/s"] = f"error: {exc}"

  if "serving" not in skip:
    try:
      from leo_suite.serving import export  # pylint: disable=g-import-not-at-top
      hook = getattr(export, "benchmark_latency", None)
    except Exception as exc:  # pylint: disable=broad-except
      hook, results["serving"] = None, {"status": f"unavailable: {exc}"}
    if hook is None:
      results.setdefault("serving", {"status": "leo_suite.serving.export.benchmark_latency "
                                               "not available yet"})
    elif not args.serving_export_dir:
      results["serving"] = {"status": "pass --serving_export_dir=<an exported version> "
                                      "to measure serving latency"}
    else:
      try:
        value = hook(args.serving_export_dir, batch_sizes=(1, 256))
        results["serving"] = value if isinstance(value, dict) else {"result": value}
      except Exception as exc:  # pylint: disable=broad-except
        results["serving"] = {"status": f"benchmark_latency failed: {type(exc).__name__}: {exc}"}

  results["total_seconds"] = time.time() - start
  print_table(results)
  if args.output:
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    fileio.atomic_write_text(args.output, json.dumps(results, indent=1, default=str))
    print(f"\nresults written to {args.output}")


if __name__ == "__main__":
  main()
