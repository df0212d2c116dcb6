"""How the benchmark times things: a window of training steps, the data wait
inside the Trainer's own pipeline, a profiled window, and repeated passes
read beside the machine's matmul rate.

This machine's speed drifts: its float32 matmul rate read every 4 seconds for
a minute ranged from 311 to 445 GFLOP/s (stop 42, an AMD EPYC VM, with
nothing else running). So an evaluation row is the median of several passes,
and its arithmetic limit is counted against rates read just before those
passes, not one read at the start of the run.
"""

import time

import numpy as np
import tensorflow as tf

from leo_suite.training import trainer as trainer_lib


def time_steps(step_fn, dataset_iter, num_steps, warmup=2):
  """Steps/s of `step_fn(episode, seed)` over `num_steps` calls after `warmup`."""
  for i in range(warmup):
    out = step_fn(next(dataset_iter), tf.constant([0, i], tf.int32))
  tf.nest.map_structure(lambda t: t.numpy(), out)
  start = time.perf_counter()
  for i in range(num_steps):
    out = step_fn(next(dataset_iter), tf.constant([0, warmup + i], tf.int32))
  tf.nest.map_structure(lambda t: t.numpy(), out)
  return num_steps / (time.perf_counter() - start)


def data_wait(trainer, num_steps, warmup=2):
  """Per step of the Trainer's own pipeline: mean wait for data, compute, wait share."""
  iterator = iter(trainer.train_dataset(0))
  timer = trainer_lib.DataWait()
  for step in range(warmup + num_steps):
    if step == warmup:
      timer = trainer_lib.DataWait()
    episode = timer.next(iterator)
    tf.nest.map_structure(lambda t: t.numpy(), trainer.train_step(episode, step))
    timer.stepped()
  return {"data_wait_ms": 1000 * timer.mean_wait,
          "step_compute_ms": 1000 * timer.compute / timer.steps,
          "data_wait_fraction": timer.fraction}


def profile_window(step_fn, dataset_iter, directory, num_steps=10):
  """A TensorBoard profile of `num_steps` steps (after the timed window)."""
  tf.profiler.experimental.start(directory)
  try:
    time_steps(step_fn, dataset_iter, num_steps, warmup=1)
  finally:
    tf.profiler.experimental.stop()


def timed_passes(run_pass, passes, rate_fn=None):
  """Times `passes` calls of `run_pass()`, each just after a `rate_fn()`
  reading when given: {"seconds": their median, "passes_seconds": each,
  "matmul_flops_per_s": the readings' median or None}, and the last pass's
  result."""
  if passes < 1:
    raise ValueError(f"passes must be >= 1, got {passes}")
  rates, seconds = [], []
  for _ in range(passes):
    if rate_fn is not None:
      rates.append(rate_fn())
    start = time.perf_counter()
    result = run_pass()
    seconds.append(time.perf_counter() - start)
  return {"seconds": float(np.median(seconds)), "passes_seconds": seconds,
          "matmul_flops_per_s": float(np.median(rates)) if rates else None}, result
