"""Evaluation on fixed episode sets: per-task accuracy, mean and 95% CI."""

import dataclasses
import json
import math
import os
import subprocess
from typing import Optional

import numpy as np
import tensorflow as tf

import leo_suite
from leo_suite import fileio
from leo_suite.models import base


@dataclasses.dataclass(frozen=True)
class Result:
  accuracy: float      # mean over tasks, in [0, 1]
  ci95: float          # 1.96 * std / sqrt(num_tasks)
  num_tasks: int
  std: float

  def as_percent(self):
    return f"{100 * self.accuracy:.2f} +- {100 * self.ci95:.2f} % ({self.num_tasks} tasks)"


def summarise(per_task_accuracy) -> Result:
  acc = np.asarray(per_task_accuracy, np.float64)
  std = float(acc.std())
  return Result(float(acc.mean()), 1.96 * std / math.sqrt(len(acc)), len(acc), std)


def task_accuracy(learner, episode):
  """Per-task query accuracy [B] after adapting on the support set (eval mode)."""
  zero_seed = tf.zeros([2], tf.int32)
  state = learner.adapt(episode.support_x, episode.support_y, training=False, seed=zero_seed)
  logits = learner.predict(state, episode.query_x, training=False, seed=zero_seed)
  return base.accuracy(logits, episode.query_y)


class Evaluator:
  """Adapts on each task's support set and scores its query set (no dropout,
  latent/weight means: training=False)."""

  def __init__(self, learner, jit_compile=False):
    self.learner = learner

    self._task_accuracy = tf.function(lambda episode: task_accuracy(learner, episode),
                                      jit_compile=jit_compile, reduce_retracing=True)

  def per_task_accuracy(self, dataset):
    values = []
    for episode in dataset:
      values.append(self._task_accuracy(episode).numpy())
    return np.concatenate(values) if values else np.zeros([0])

  def evaluate(self, dataset) -> Result:
    return summarise(self.per_task_accuracy(dataset))


def evaluate_baseline(logits_fn, dataset) -> Result:
  """Scores a non-learned `logits_fn(support_x, query_x)` on the same episodes."""
  compiled = tf.function(logits_fn, reduce_retracing=True)
  values = [base.accuracy(compiled(e.support_x, e.query_x), e.query_y).numpy()
            for e in dataset]
  return summarise(np.concatenate(values))


def code_version():
  """Package version plus the git commit of the checkout, when there is one."""
  here = os.path.dirname(os.path.dirname(os.path.abspath(leo_suite.__file__)))
  try:
    commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                            text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return leo_suite.__version__
  return f"{leo_suite.__version__}+{commit[:12]}{'-dirty' if dirty else ''}"


def write_result(path, result: Result, config: dict, data_hashes: dict, split: str,
                 extra: Optional[dict] = None):
  """Writes the result JSON atomically."""
  payload = {"split": split, "accuracy": result.accuracy, "ci95": result.ci95,
             "std": result.std, "num_tasks": result.num_tasks, "config": config,
             "seed": config.get("seed"), "data_sha256": data_hashes,
             "code_version": code_version()}
  payload.update(extra or {})
  fileio.atomic_write_text(path, json.dumps(payload, indent=1, sort_keys=True))
  return payload
