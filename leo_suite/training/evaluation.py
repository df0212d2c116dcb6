"""Evaluation on fixed episode sets: per-task accuracy, mean and 95% CI.

One `Evaluator` serves one device and a tf.distribute strategy: under
MirroredStrategy each batch of the fixed set is split over the replicas and
the per-task accuracies come back in order, so the result is the
single-device one (evaluation draws no noise). Under MultiWorkerMirrored
every worker scores the whole set locally (no collectives to deadlock on).
"""

import dataclasses
import math
import time
from typing import Callable, Optional

from absl import logging
import numpy as np
import tensorflow as tf

from leo_suite import distribute
from leo_suite.models import base


@dataclasses.dataclass(frozen=True)
class Result:
  accuracy: float      # mean over tasks, in [0, 1]
  ci95: float          # 1.96 * std / sqrt(num_tasks)
  num_tasks: int
  std: float

  def as_percent(self):
    return f"{100 * self.accuracy:.2f} +- {100 * self.ci95:.2f} % ({self.num_tasks} tasks)"

  def as_dict(self):
    return dataclasses.asdict(self)


def summarise(per_task_accuracy) -> Result:
  acc = np.asarray(per_task_accuracy, np.float64)
  std = float(acc.std())
  return Result(float(acc.mean()), 1.96 * std / math.sqrt(len(acc)), len(acc), std)


class Progress:
  """Logs `what: done/total <unit>, rate, ETA` at most every `interval_s` seconds
  (and at the end), through `log(message)`."""

  def __init__(self, what: str, total: Optional[int], unit: str = "tasks",
               interval_s: float = 10.0, log: Callable[..., None] = logging.info):
    self.what, self.total, self.unit, self.interval_s, self.log = (
        what, total, unit, interval_s, log)
    self.start = self.last = time.time()
    self.done = 0

  def update(self, count: int):
    self.done += count
    now = time.time()
    if now - self.last < self.interval_s and (not self.total or self.done < self.total):
      return
    self.last = now
    rate = self.done / max(now - self.start, 1e-9)
    eta = (f", ETA {format_seconds((self.total - self.done) / max(rate, 1e-9))}"
           if self.total else "")
    of = f"/{self.total}" if self.total else ""
    self.log(f"{self.what}: {self.done}{of} {self.unit}, {rate:.1f} {self.unit}/s{eta}")


def format_seconds(seconds):
  seconds = int(seconds)
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def task_accuracy(learner, episode):
  """Per-task query accuracy [B] after adapting on the support set (eval mode)."""
  zero_seed = tf.zeros([2], tf.int32)
  state = learner.adapt(episode.support_x, episode.support_y, training=False, seed=zero_seed)
  logits = learner.predict(state, episode.query_x, training=False, seed=zero_seed)
  return base.accuracy(logits, episode.query_y)


class Evaluator:
  """Adapts on each task's support set and scores its query set (no dropout,
  latent/weight means: training=False), on one device or a strategy."""

  def __init__(self, learner, strategy=None, jit_compile=False):
    self.learner = learner
    score = lambda episode: task_accuracy(learner, episode)
    self.strategy = strategy if distribute.splits_batches(strategy) else None
    if self.strategy is None:
      self._batch_accuracy = tf.function(score, jit_compile=jit_compile,
                                         reduce_retracing=True)
    else:
      per_replica = tf.function(score, jit_compile=True) if jit_compile else score

      @tf.function(reduce_retracing=True)
      def batch_accuracy(episode):
        return distribute.local_concat(self.strategy,
                                       self.strategy.run(per_replica, args=(episode,)))
      self._batch_accuracy = batch_accuracy

  def per_task_accuracy(self, dataset, progress: Optional[Progress] = None):
    if self.strategy is not None:
      dataset = self.strategy.experimental_distribute_dataset(dataset)
    values = []
    for episode in dataset:
      values.append(self._batch_accuracy(episode).numpy())
      if progress:
        progress.update(len(values[-1]))
    return np.concatenate(values) if values else np.zeros([0])

  def evaluate(self, dataset, progress: Optional[Progress] = None) -> Result:
    return summarise(self.per_task_accuracy(dataset, progress))


def evaluate_baseline(logits_fn, dataset) -> Result:
  """Scores a non-learned `logits_fn(support_x, query_x)` on the same episodes."""
  compiled = tf.function(logits_fn, reduce_retracing=True)
  values = [base.accuracy(compiled(e.support_x, e.query_x), e.query_y).numpy()
            for e in dataset]
  return summarise(np.concatenate(values))
