"""Throughput and memory of every learner on this machine, in one run
(scripts/benchmark.py is its command line).

For each learner (5-way, meta-batch 12, D = 640, V = 15 queries per class in
meta-training):
  * meta-train steps/s and tasks/s at 1-shot and 5-shot (the Trainer's step:
    loss and gradients, NaN guard, clipping, Adam; episodes from the real
    EpisodeSampler pipeline), without and with XLA (jit_compile);
  * the same step written per task with tf.map_fn (each task a B = 1
    meta-batch, same maths, gradients averaged) and the batched/map_fn ratio;
  * evaluation tasks/s on the fixed-set path the runner takes (real EpisodeSampler;
    V = 600 - K queries per class, as LEO's test protocol; the runner's default XLA
    and test batch; the median of EVAL_PASSES passes), against the gather path (one
    pass); for LEO also 10,000 test tasks' time; FLOPs per task and the fraction of
    its limit (flops.py) at the matmul rate read beside the row (timing.py);
  * peak memory of one meta-training step (resident-set high-water mark increase,
    a fresh subprocess per configuration); MAML and iMAML at 1, 5, 10, 20 inner steps.
  * data wait: in the Trainer's own input pipeline (EpisodeSampler -> tf.data ->
    step), the mean time per step in `next(iterator)` and its share of the step
    (results fetched with .numpy(), as the Trainer does: train/data_wait_fraction).
Also embedding extraction (Conv-4 28x28, ResNet-12 84x84) and, if the serving module
provides `benchmark_latency`, serving latency. Embeddings are synthetic (random,
unit-norm after the sampler), so accuracies are meaningless here. The machine
may be shared: compare ratios measured in the same run.

The targets (issues 14 and 32) are checked per learner and shot
(report.target_checks, the JSON's "targets" list of {name, learner, shots,
value, threshold, holds}); report.TARGET_LABELS says what each means.
"""

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf

from leo_suite import errors
from leo_suite import progress
from leo_suite.bench import flops
from leo_suite.bench.timing import data_wait, profile_window, time_steps, timed_passes
from leo_suite.bench.report import (BATCH, DIM, IMAGES_PER_CLASS, LEARNER_CONFIGS,
                                    MEMORY_INNER_STEPS, MODELS, NUM_WAYS, SHOTS,
                                    TRAIN_QUERIES, target_checks)
from leo_suite.data import embeddings
from leo_suite.data import episodes
from leo_suite.data.episodes import Episode
from leo_suite.models import registry
from leo_suite.pretrain import extract
from leo_suite.serving import latency
from leo_suite.training import run as run_lib
from leo_suite.training import settings as settings_lib
from leo_suite.training import trainer as trainer_lib
from leo_suite.training.evaluation import TABLE_GROUP_TASKS

# The folder holding leo_suite: the memory probes' subprocesses import it from there.
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EVAL_PASSES = 3  # timed passes of an evaluation row's runner path (the row: their median)


def synthetic_split(num_classes, images_per_class, dim=DIM, seed=0):
  """Random embeddings in LEO's layout (classes contiguous)."""
  rng = np.random.default_rng(seed)
  table = rng.standard_normal((num_classes * images_per_class, dim), dtype=np.float32)
  counts = np.full(num_classes, images_per_class, np.int64)
  return embeddings.EmbeddingSplit(
      table, [f"c{i}" for i in range(num_classes)],
      np.arange(num_classes, dtype=np.int64) * images_per_class, counts,
      [f"i{i}" for i in range(len(table))], {})


def learner_config(model, overrides=None):
  """The learner's Config benchmarked: its defaults, LEARNER_CONFIGS, `overrides`."""
  fields = dict(LEARNER_CONFIGS.get(model, {}), **(overrides or {}))
  return registry.spec(model).config_class(**fields)


def make_run(model, directory, overrides=None, **settings):
  """A run (not written to disk) of `model` with the benchmark's config and `settings`."""
  settings = settings_lib.default_settings(model, learner_config(model, overrides),
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
      single = Episode(*[t[tf.newaxis] for t in task])
      loss, grads, _ = learner.loss_and_gradients(single, seed=seed)
      return loss, tuple(grads)
    signature = (tf.TensorSpec([], learner.dtype),
                 tuple(tf.TensorSpec(v.shape, v.dtype) for v in variables))
    losses, grads = tf.map_fn(one_task, tuple(episode), fn_output_signature=signature)
    grads = [tf.reduce_mean(g, axis=0) for g in grads]
    return trainer._apply(tf.reduce_mean(losses), grads, {})  # pylint: disable=protected-access

  return tf.function(step, autograph=False)


def train_throughput(model, shots, train_split, num_steps, with_map_fn=True, with_xla=True,
                     profile_dir=""):
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
        continue
      if name != "batched":
        continue
      row.update(data_wait(trainer, num_steps))
      if profile_dir:
        profile_window(trainer._train_step, data, profile_dir)  # pylint: disable=protected-access
      if with_map_fn:
        row["map_fn"] = time_steps(map_fn_step(trainer), data, max(2, num_steps // 4), warmup=1)
  return row


def eval_split():
  """The evaluation benchmark's test split: 20 classes of IMAGES_PER_CLASS rows."""
  return synthetic_split(20, IMAGES_PER_CLASS, seed=1)


def recount_limits(results):
  """Each evaluation row's FLOPs and limit columns, and the targets, counted
  again by the current `flops` (the row's tasks/s, path and matmul rate kept:
  the rate read beside its passes, or the run's for rows written before stop
  42): a saved run corrected without timing anything again."""
  rate, test_split = results["machine"].get("matmul_flops_per_s"), eval_split()
  if not rate:
    raise errors.DataError("benchmark JSON without matmul_flops_per_s: nothing to recount")
  for model, per_model in results.get("eval", {}).items():
    for shots, row in per_model.items():
      if "error" not in row:  # rows since stop 42 carry the rate read beside their passes
        row.update(flops.evaluation_limits(build(model), int(shots), row,
                                           row.get("matmul_flops_per_s", rate), test_split))
  results["targets"] = target_checks(results)
  return results


def eval_sampler(test_split, shots):
  """NUM_WAYS-way tasks with every remaining image of a class as a query."""
  return episodes.EpisodeSampler(
      test_split, episodes.EpisodeSpec(NUM_WAYS, shots, IMAGES_PER_CLASS - shots))


def runner_evaluator(model):
  """(Evaluator, jit_adapt, jit_readout, test batch) as the runner sets them by default."""
  run = make_run(model, "")
  return (run.evaluator(run.build_learner()), run.jit_compile, run.jit_readout,
          run.settings["metatest_batch_size"])


def eval_throughput(model, shots, test_split, num_tasks, batch_size=200, passes=EVAL_PASSES,
                    rate_fn=flops.matmul_rate):
  """Evaluation tasks/s of the runner's path (`Evaluator.method`, here the
  table path, with the runner's default XLA settings and test batch): the
  median of `passes` timed passes, each just after a reading of the matmul
  rate (`rate_fn`; the row's rate is their median, so its limit is counted
  against the machine's speed at that time, which drifts here by a fifth
  within a minute); and of the gather path (batches of `batch_size`, one
  pass), on the same fixed tasks, after a pass over other tasks that
  compiles the timed passes' shapes."""
  queries = IMAGES_PER_CLASS - shots
  sampler = eval_sampler(test_split, shots)
  evaluator, jit, jit_readout, runner_batch = runner_evaluator(model)
  chosen = evaluator.method(sampler)
  row = {"tasks": num_tasks, "queries_per_class": queries, "method": chosen,
         "jit_adapt": jit, "jit_readout": jit_readout, "table_batch": runner_batch}
  accuracies = {}
  for method in dict.fromkeys([chosen, "gather"]):
    batch = runner_batch if method == "table" else batch_size
    warm_up = min(num_tasks, TABLE_GROUP_TASKS if method == "table" else batch)
    evaluator.fixed_accuracy(sampler, 99, warm_up, batch, method=method)
    runner_path = method == chosen
    timed, accuracies[method] = timed_passes(
        lambda: evaluator.fixed_accuracy(sampler, 1, num_tasks, batch, method=method),
        passes if runner_path else 1, rate_fn if runner_path else None)
    assert len(accuracies[method]) == num_tasks
    row[f"{method}_seconds"] = timed["seconds"]
    if runner_path:
      row.update(passes_seconds=timed["passes_seconds"],
                 matmul_flops_per_s=timed["matmul_flops_per_s"])
  row["seconds"] = row[f"{chosen}_seconds"]
  row["tasks_per_s"] = num_tasks / row["seconds"]
  row["gather_tasks_per_s"] = num_tasks / row["gather_seconds"]
  # Query predictions that differ between the paths: the same logits summed
  # in another order can flip an argmax on a float tie (random embeddings put
  # every task at chance, where ties are common); 0 on the test fixtures.
  per_task = np.round((accuracies[chosen] - accuracies["gather"]) * NUM_WAYS * queries)
  row["query_flips"] = int(np.abs(per_task).sum())
  row["queries"] = num_tasks * NUM_WAYS * queries
  return row


def sampler_only(shots, test_split, num_tasks, batch_size=200):
  """Seconds to draw `num_tasks` evaluation tasks (gather + L2-normalise) alone."""
  sampler = eval_sampler(test_split, shots)
  start = time.perf_counter()
  for _ in sampler.fixed_set(1, num_tasks, batch_size):
    pass
  return time.perf_counter() - start


# -- peak memory, one fresh process per configuration --------------------------
def peak_rss_mb(reset=False):
  """The process's RSS high-water mark (MB, progress.peak_rss_mib); `reset` first
  sets it to the current RSS (Linux: /proc/self/clear_refs), so that a probe
  started by a large benchmark process does not report the parent's peak."""
  if reset:
    with contextlib.suppress(OSError):
      with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
  return progress.peak_rss_mib()


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
  episode = Episode(tensor([BATCH, NUM_WAYS, shots, DIM]), labels(shots),
                         tensor([BATCH, NUM_WAYS, TRAIN_QUERIES, DIM]), labels(TRAIN_QUERIES))

  @tf.function(autograph=False)
  def step(seed):
    loss, grads, _ = learner.loss_and_gradients(episode, seed=seed)
    return loss, grads

  step.get_concrete_function(tf.TensorSpec([2], tf.int32))  # trace outside the window
  before = peak_rss_mb(reset=True)
  for i in range(3):
    tf.nest.map_structure(lambda t: t.numpy(), step(tf.constant([0, i], tf.int32)))
  after = peak_rss_mb()
  gpu = None
  if tf.config.list_physical_devices("GPU"):
    gpu = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
  return {"peak_rss_increase_mb": after - before, "peak_rss_mb": after, "gpu_peak_mb": gpu}


def run_memory_probe(model, shots, inner_steps=None, timeout=600):
  """`memory_probe` in a fresh Python process (its own RSS high-water mark)."""
  code = ("import json, sys; from leo_suite.bench import benchmark; "
          "steps = sys.argv[3]; print(json.dumps(benchmark.memory_probe("
          "sys.argv[1], int(sys.argv[2]), int(steps) if steps else None)))")
  args = [sys.executable, "-c", code, model, str(shots),
          str(inner_steps) if inner_steps is not None else ""]
  path = os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=path)
  proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
  if proc.returncode != 0:
    return {"error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def run(models, quick=False, skip=(), eval_tasks=0, eval_batch_size=25, leo_eval_tasks=10000,
        profile_dir="", serving_export_dir=""):
  """Measures `models` (the sections not in `skip`); the results, with their targets.
  Sections: train, xla, map_fn, eval, memory, extraction, serving. `eval_tasks`
  per learner (0: 2,000, quick 200); LEO 1-shot takes `leo_eval_tasks` unless
  `quick`. `profile_dir`: a TensorBoard profile of models[0]'s 1-shot step."""
  unknown = [m for m in models if m not in MODELS]
  if unknown:
    raise errors.ConfigError(f"--only: unknown learner(s) {unknown}; choose from {list(MODELS)}")
  skip = set(skip)
  num_steps = 10 if quick else 40
  eval_tasks = eval_tasks or (200 if quick else 2000)
  results = {"machine": {"cpus": os.cpu_count(), "tf": tf.__version__,
                         "gpus": len(tf.config.list_physical_devices("GPU")),
                         "load_average": os.getloadavg()},
             "settings": {"num_ways": NUM_WAYS, "dim": DIM, "meta_batch": BATCH,
                          "train_queries": TRAIN_QUERIES, "steps_timed": num_steps,
                          "quick": quick,
                          "learner_configs": {m: dataclasses.asdict(learner_config(m))
                                              for m in models}},
             "train": {}, "eval": {}, "memory": {}}
  start = time.time()
  train_split = synthetic_split(64, 40)
  if not {"train", "eval"} <= skip:
    results["machine"]["matmul_flops_per_s"] = flops.matmul_rate()
  for model in (models if "train" not in skip else []):
    results["train"][model] = {}
    for shots in SHOTS:
      profile = profile_dir if (model, shots) == (models[0], 1) else ""
      row_rate = flops.matmul_rate()  # the machine's speed drifts (timing.py)
      row = train_throughput(model, shots, train_split, num_steps,
                             with_map_fn="map_fn" not in skip, with_xla="xla" not in skip,
                             profile_dir=profile)
      row["matmul_flops_per_s"] = row_rate
      if profile:
        results["profile"] = {"learner": model, "shots": shots, "directory": profile}
      row.update(flops.training_limits(build(model), shots, row, row_rate))
      results["train"][model][str(shots)] = row
      print(f"[{time.time() - start:6.0f}s] train {model} {shots}-shot: "
            f"{json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()})}",
            flush=True)

  if "eval" not in skip:
    test_split = eval_split()
    results["sampler_seconds"] = {}
    for shots in SHOTS:
      results["sampler_seconds"][str(shots)] = {
          "tasks": eval_tasks,
          "seconds": sampler_only(shots, test_split, eval_tasks, eval_batch_size)}
    for model in models:
      results["eval"][model] = {}
      for shots in SHOTS:
        tasks = (leo_eval_tasks if (model == "leo" and shots == 1 and not quick)
                 else eval_tasks)
        try:
          row = eval_throughput(model, shots, test_split, tasks, eval_batch_size)
          row.update(flops.evaluation_limits(build(model), shots, row, row["matmul_flops_per_s"],
                                             test_split))
        except Exception as exc:  # pylint: disable=broad-except
          row = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        results["eval"][model][str(shots)] = row
        print(f"[{time.time() - start:6.0f}s] eval {model} {shots}-shot: {row}", flush=True)

  if "memory" not in skip:
    for model in models:
      for shots in SHOTS:
        results["memory"][f"{model} {shots}-shot default"] = run_memory_probe(model, shots)
    for model in [m for m in ("maml", "imaml") if m in models]:
      for steps in MEMORY_INNER_STEPS:
        results["memory"][f"{model} 5-shot T={steps}"] = run_memory_probe(model, 5, steps)
    print(f"[{time.time() - start:6.0f}s] memory: {results['memory']}", flush=True)

  if "extraction" not in skip:
    results["extraction"] = {}
    for backbone, size, channels, count in (("conv4", 28, 1, 2048), ("resnet12", 84, 3, 256)):
      count = count // 4 if quick else count
      try:
        rate = extract.benchmark_extraction(backbone, size, channels, batch_size=64,
                                            num_images=count)
        results["extraction"][f"{backbone} {size}x{size} images/s"] = round(rate, 1)
      except Exception as exc:  # pylint: disable=broad-except
        results["extraction"][f"{backbone} {size}x{size} images/s"] = f"error: {exc}"

  if "serving" not in skip:
    if not serving_export_dir:
      results["serving"] = {"status": "pass --serving_export_dir=<an exported version> "
                                      "to measure serving latency"}
    else:
      try:
        value = latency.benchmark_latency(serving_export_dir, batch_sizes=(1, 256))
        results["serving"] = value if isinstance(value, dict) else {"result": value}
      except Exception as exc:  # pylint: disable=broad-except
        results["serving"] = {"status": f"benchmark_latency failed: {type(exc).__name__}: {exc}"}

  results["total_seconds"] = time.time() - start
  results["targets"] = target_checks(results)
  return results
