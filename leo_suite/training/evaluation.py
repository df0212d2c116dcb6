"""Evaluation on fixed episode sets: per-task accuracy, mean and 95% CI.

One `Evaluator` serves one device and a tf.distribute strategy: under
MirroredStrategy each batch of the fixed set is split over the replicas and
the per-task accuracies come back in order, so the result is the
single-device one (evaluation draws no noise). Under MultiWorkerMirrored
every worker scores the whole set locally (no collectives to deadlock on).

Two ways to score a fixed set of an `EpisodeSampler` (`evaluate_fixed`):
  * gather: every task's query set is copied out of the embedding table and
    passed to `predict` (the tf.data path; the only one under a strategy
    that splits batches).
  * table: only the support sets are read per task (adapted into the
    learner's `readout_state`, e.g. Reptile's factored heads). The adapted tasks are
    scored in groups: each class's rows are taken once, as a slice of the
    table, and scored against every task of the group that holds the class,
    as one matrix product when the learner's classifier starts with a linear
    map of the query (`Readout`: LEO, MAML-style heads, R2D2, ProtoNet,
    Matching without FCE, Relation) and through `predict` on those rows
    otherwise; a mask keeps each task's own query images. This
    removes the copy of N*V*D floats per task that bounds the gather path
    when V is most of a class (the release's V = all remaining images).
Both give the same per-task accuracies (tests/test_evaluation.py). The
table path reads a class's rows once per evaluation (cached readout row
maps), gathers each batch's support sets in one op, and scores each class's
tasks in one call: when their intermediates would exceed a chunk bound, the
call loops over chunks of tasks in its graph (`in_chunks`). It may compile
the readout with XLA (`jit_readout`, from `xla.resolve_readout`); XLA
compiles once per shape, so those calls are padded to power-of-two task (or
chunk) counts with masked copies.
"""

import dataclasses
import math
from typing import Optional

import numpy as np
import tensorflow as tf

from leo_suite import distribute
from leo_suite.models import base
from leo_suite.progress import Progress
from leo_suite.training import xla


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


def task_accuracy(learner, episode):
  """Per-task query accuracy [B] after adapting on the support set (eval mode)."""
  zero_seed = tf.zeros([2], tf.int32)
  state = learner.adapt(episode.support_x, episode.support_y, training=False, seed=zero_seed)
  logits = learner.predict(state, episode.query_x, training=False, seed=zero_seed)
  return base.accuracy(logits, episode.query_y)


def readout_scores(learner, features, weights, bias, state, num_tasks):
  """Logits [P, R, N] of R rows under P tasks' `Readout`s, from the rows'
  row_map `features` [R, d]: features weights^T + bias (weights [P, M, d],
  bias [P, M]; the features themselves when weights is None), then
  `learner.finish_readout` when `state` (the P tasks' readout states) is
  given. The table path's product (Evaluator) and its FLOP count
  (`table_task_accuracy`)."""
  if weights is None:  # scores = the row features, the same for every task
    scores = features[tf.newaxis]  # [1, R, M]: finish_readout broadcasts it
    if state is None:
      scores = tf.broadcast_to(scores, tf.concat([[num_tasks], tf.shape(features)], 0))
  else:
    # [P M, R], not [R, P M]: TF's CPU matmul makes a wide product at half
    # the rate of its transpose ([600, 640] x [640, 4096]: 63 vs 142 GFLOP/s,
    # experiments/speed_probes.py --orientation); the transpose per task costs
    # the same copy as the one it replaces.
    pairs, width = tf.shape(weights)[0], tf.shape(weights)[1]
    scores = tf.matmul(tf.reshape(weights, [pairs * width, -1]), features, transpose_b=True)
    scores = tf.transpose(tf.reshape(scores, [pairs, width, -1]), [0, 2, 1])  # [P, R, M]
  if bias is not None:
    scores += bias[:, tf.newaxis]
  if state is not None:
    scores = learner.finish_readout(scores, state)
  return scores


def table_task_accuracy(learner, episode):
  """Query accuracy [1] of a one-task `episode` as the table path computes it
  (`Evaluator.fixed_accuracy`): `readout_state` on the support set, then the
  query rows through the task's `Readout` (row_map, readout_scores), or
  `predict` when the learner has no readout. task_accuracy's value up to
  float32 near-ties; bench/flops counts this graph for table-path rows."""
  zero_seed = tf.zeros([2], tf.int32)
  state = learner.readout_state(episode.support_x, episode.support_y, seed=zero_seed)
  readout = learner.readout(state)
  if readout is None:
    logits = learner.predict(state, episode.query_x, training=False, seed=zero_seed)
    return base.accuracy(logits, episode.query_y)
  if episode.query_x.shape[0] != 1:
    raise ValueError(f"table_task_accuracy scores one task, got {episode.query_x.shape[0]}")
  rows = tf.reshape(episode.query_x, [-1, tf.shape(episode.query_x)[-1]])
  scores = readout_scores(learner, readout.row_map(rows), readout.weights, readout.bias,
                          finish_state(readout, state), 1)
  logits = tf.reshape(scores, tf.concat([tf.shape(episode.query_y), [-1]], 0))
  return base.accuracy(logits, episode.query_y)


# Tasks adapted before their query images are scored from the table: larger
# groups share each class's slice among more tasks.
TABLE_GROUP_TASKS = 1000
# Floats of adapted state held for one group (1 GiB of float32): a group has
# fewer tasks when each task's state is large. An MLP head's adapted first
# layer is D x H per task: L2F with 4,096 hidden units on D = 256 embeddings
# held 1,000 x 1.1M floats and its runner was killed at 15 GB (24 GB machine).
TABLE_STATE_FLOATS = 1 << 28
# Floats of a class's rows x readout width per table call when the scores are
# the logits (a linear readout; bounds the memory of one call).
TABLE_CHUNK_FLOATS = 1 << 24
# The bound when more than one product follows the rows' scores (a readout's
# `finish`, or the learner's whole predict without a readout): each of those
# intermediates is a fresh buffer of about this size, and above glibc's 32 MB
# mmap ceiling every call page-faults it in again. 5-way 5-shot Relation on
# the benchmark's table: 2.0 million minor faults and 4.7 s of system time per
# 2,000 tasks at 1 << 24, under 10,000 faults and 0.1 s at 1 << 22, 2x the tasks/s;
# L2F 1.5x; linear readouts no faster (`experiments/speed_probes.py --evaluation`).
TABLE_FINISH_CHUNK_FLOATS = 1 << 22
EVALUATION_METHODS = ("auto", "table", "gather")


def table_group_tasks(state, num_tasks: int, batch_size: int) -> int:
  """Tasks adapted before a group is scored: TABLE_GROUP_TASKS, or fewer so
  their states (`state`: one adapted batch of `num_tasks` tasks) stay within
  TABLE_STATE_FLOATS; a multiple of batch_size, at least one batch."""
  floats = sum(int(np.prod(t.shape)) for t in tf.nest.flatten(state) if t is not None)
  per_task = floats / max(1, num_tasks)
  tasks = min(TABLE_GROUP_TASKS, int(TABLE_STATE_FLOATS // max(per_task, 1.0)))
  return batch_size * max(1, tasks // batch_size)


def table_chunk_tasks(readout, rows: int, dim: int) -> int:
  """Tasks per table call for a class of `rows` rows: at most
  TABLE_CHUNK_FLOATS floats of rows x width (width: the readout's `width`,
  else its weights', else the embedding `dim`), TABLE_FINISH_CHUNK_FLOATS
  when a finish or the learner's predict follows."""
  width = dim if readout is None or readout.weights is None else readout.weights.shape[1]
  if readout is not None and readout.width:
    width = readout.width
  budget = (TABLE_FINISH_CHUNK_FLOATS if readout is None or readout.finish
            else TABLE_CHUNK_FLOATS)
  return max(1, budget // (rows * width))


def table_pays(spec, split) -> bool:
  """Whether scoring whole class slices beats gathering queries: the queries
  are at least half of an average class (else most scored rows are masked)."""
  return spec.examples_per_class >= 0.5 * float(np.mean(split.class_count))


class Evaluator:
  """Adapts on each task's support set and scores its query set (no dropout,
  latent/weight means: training=False), on one device or a strategy."""

  def __init__(self, learner, strategy=None, jit_compile=False, jit_readout=False):
    self.learner = learner
    score = lambda episode: task_accuracy(learner, episode)
    zero_seed = tf.zeros([2], tf.int32)
    adapt = lambda x, y: learner.readout_state(x, y, seed=zero_seed)
    self._adapt = xla.WithFallback(
        lambda jit: adapt_in_parts(
            tf.function(adapt, jit_compile=jit, reduce_retracing=True, autograph=False),
            learner.evaluation_adapt_tasks),
        jit_compile, f"{type(learner).__name__} evaluation (adapt)")

    def score_readout(features, per_task, labels, mask):
      """features [R, d] of one class's rows under P tasks' readouts
      (per_task: their weights, bias and state, each None or [P, ...])."""
      weights, bias, state = per_task
      scores = readout_scores(learner, features, weights, bias, state, tf.shape(labels)[0])
      return _hits(tf.argmax(scores, -1, output_type=tf.int32), labels, mask)
    # With XLA, what compiles is one chunk's score (one shape per chunk
    # size); the loop over a class's chunks stays in the plain graph, so a
    # class is padded to whole chunks only, not to a power-of-two number of
    # them (about 250 tasks a class in a group of 1,000: a class of 257
    # scored 512).
    self._score_readout = xla.WithFallback(
        lambda jit: tf.function(
            in_chunks(tf.function(score_readout, jit_compile=True, reduce_retracing=True,
                                  autograph=False) if jit else score_readout),
            reduce_retracing=True, autograph=False),
        jit_readout, f"{type(learner).__name__} evaluation (readout)")

    def score_generic(rows, state, labels, mask):
      shape = tf.shape(labels)[0:1]
      query_x = tf.broadcast_to(rows, tf.concat([shape, [1], tf.shape(rows)], 0))
      logits = learner.predict(state, query_x, training=False, seed=zero_seed)
      return _hits(tf.argmax(logits[:, 0], -1, output_type=tf.int32), labels, mask)
    self._score_generic = tf.function(in_chunks(score_generic), reduce_retracing=True,
                                      autograph=False)
    self.strategy = strategy if distribute.splits_batches(strategy) else None
    if self.strategy is None:
      build = lambda jit: tf.function(score, jit_compile=jit, reduce_retracing=True,
                                      autograph=False)
    else:
      def build(jit):
        per_replica = tf.function(score, jit_compile=True, autograph=False) if jit else score

        @tf.function(reduce_retracing=True, autograph=False)
        def batch_accuracy(episode):
          return distribute.local_concat(self.strategy,
                                         self.strategy.run(per_replica, args=(episode,)))
        return batch_accuracy
    self._batch_accuracy = xla.WithFallback(build, jit_compile,
                                            f"{type(learner).__name__} evaluation")

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

  # -- fixed sets of an EpisodeSampler ---------------------------------------
  def method(self, sampler, requested: str = "auto") -> str:
    """The scoring path `evaluate_fixed` takes ('table' or 'gather')."""
    if requested not in EVALUATION_METHODS:
      raise ValueError(f"evaluation method must be one of {EVALUATION_METHODS}, "
                       f"got {requested!r}")
    if self.strategy is not None:
      return "gather"  # batches split over replicas
    if requested == "auto":
      return "table" if table_pays(sampler.spec, sampler.split) else "gather"
    return requested

  def fixed_accuracy(self, sampler, seed: int, num_tasks: int, batch_size: int,
                     progress: Optional[Progress] = None, method: str = "auto"):
    """Per-task accuracies [num_tasks] of `sampler.fixed_set(seed, num_tasks, ...)`."""
    if self.method(sampler, method) == "gather":
      return self.per_task_accuracy(sampler.fixed_set(seed, num_tasks, batch_size), progress)
    group = None  # tasks per group: set by the size of the first adapted state
    correct = np.zeros([num_tasks], np.int64)
    pending, first, row_features = [], 0, {}
    draws = sampler.drawn_supports(seed, batch_size, 0, num_tasks)
    for batch_index, (classes, picks, support_x, support_y) in enumerate(draws):
      state = self._adapt(support_x, support_y)
      group = group or table_group_tasks(state, len(classes), batch_size)
      pending.append((classes.numpy(), picks.numpy(), state))
      done = (batch_index + 1) * batch_size >= num_tasks
      if sum(len(p[0]) for p in pending) >= group or done:
        size = self._score_group(sampler, pending, correct[first:], row_features)
        first += size
        pending = []
        if progress:
          progress.update(size)
    spec = sampler.spec
    # float32 hits / queries, correctly rounded, as base.accuracy's mean is.
    return correct.astype(np.float32) / np.float32(spec.num_ways * spec.num_queries)

  def evaluate_fixed(self, sampler, seed, num_tasks, batch_size, progress=None,
                     method="auto") -> Result:
    return summarise(self.fixed_accuracy(sampler, seed, num_tasks, batch_size,
                                         progress, method))

  def _score_group(self, sampler, pending, correct, row_features):
    """Adds each task's correct queries of a group of adapted batches to
    `correct` (the group's slice); returns the number of tasks.
    `row_features` caches each class's readout row_map across groups."""
    classes = np.concatenate([p[0] for p in pending])          # [T, N]
    picks = np.concatenate([p[1] for p in pending])            # [T, N, K+V]
    state = tf.nest.map_structure(lambda *parts: tf.concat(parts, 0),
                                  *[p[2] for p in pending])
    readout = self.learner.readout(state)
    num_shots = sampler.spec.num_shots
    for class_id in np.unique(classes):
      tasks, labels = np.nonzero(classes == class_id)
      count = int(sampler.split.class_count[class_id])
      mask = np.zeros([len(tasks), count], bool)
      mask[np.arange(len(tasks))[:, np.newaxis], picks[tasks, labels, num_shots:]] = True
      rows = None
      if readout is None or class_id not in row_features:  # read once per class
        rows = sampler.class_rows(class_id)
      if readout is not None and class_id not in row_features:
        row_features[class_id] = readout.row_map(rows)
      bound = table_chunk_tasks(readout, count, sampler.split.embeddings.shape[1])
      # One call per class: when its tasks are more than `bound`, they are
      # scored a chunk at a time in a loop of the graph (a call per chunk cost
      # ~2 ms of dispatch each: Relation at 5-way, 10 tasks a chunk, spent half
      # its evaluation there), padded with masked copies of the first task to
      # whole chunks. With XLA, which compiles each shape once, a class of at
      # most `bound` tasks is padded to a power of two.
      size = len(tasks)
      # The chunk is a power of two (a trace per distinct chunk, not per class size).
      chunk = 1 << (bound.bit_length() - 1) if size > bound else None
      jit = self._score_readout.jit if readout is not None else False
      if chunk is None:
        pad = min(bound, 1 << (size - 1).bit_length()) - size if jit else 0
      else:
        pad = -(-size // chunk) * chunk - size
      part = tf.constant(np.concatenate([tasks, np.repeat(tasks[:1], pad)]), tf.int32)
      labels_part = tf.constant(np.concatenate([labels, np.repeat(labels[:1], pad)]), tf.int32)
      mask_part = tf.constant(np.concatenate([mask, np.zeros([pad, count], bool)]))
      if readout is None:
        hits = self._score_generic(rows, state, part, labels_part, mask_part, chunk=chunk)
      else:  # the group's tensors: each chunk gathers its tasks' rows of them
        per_task = (readout.weights, readout.bias, finish_state(readout, state))
        hits = self._score_readout(row_features[class_id], per_task, part, labels_part,
                                   mask_part, chunk=chunk)
      np.add.at(correct, tasks, hits.numpy()[:size])
    return len(classes)


def adapt_in_parts(adapt, tasks_per_call: Optional[int]):
  """`adapt(support_x, support_y)`, or with `tasks_per_call` a graph that
  calls it on parts of the batch of at most that many tasks (the largest
  divisor of the batch within it, so every part has one shape) and
  concatenates their states. The parts are independent ops of one graph,
  which TF runs side by side: Meta-LSTM's XLA adaptation of 2,000 tasks in
  parts of 8 took 3.1 s called part by part and 1.5 s in one graph (CPU /
  wall 1.4 vs 1.9 on 2 cores)."""
  if not tasks_per_call:
    return adapt

  def in_parts(support_x, support_y):
    size = int(support_x.shape[0])
    part = xla.part_size(size, tasks_per_call)
    states = [adapt(support_x[i:i + part], support_y[i:i + part])
              for i in range(0, size, part)]
    return tf.nest.map_structure(lambda *parts: tf.concat(parts, 0), *states)
  return tf.function(in_parts, autograph=False)


def finish_state(readout, state):
  """What `finish_readout` is given of the tasks' `state`: None without a
  finish, the readout's finish_state when it names one, else the state."""
  if not readout.finish:
    return None
  return state if readout.finish_state is None else readout.finish_state


def in_chunks(score):
  """score(shared, per_task, labels, mask) -> hits [P] as a function of
  (shared, group, tasks, labels, mask, chunk): `group` is a nest of [G, ...]
  tensors and Nones of which tasks [P] picks the scored tasks' rows. With a
  static `chunk`, the P tasks (a multiple of it) are scored `chunk` at a time
  in a loop of the graph, each chunk gathering its own rows, so that one call
  bounds its intermediates by one chunk's and no class-sized copy of the
  group's tensors is made (Meta-LSTM's W_1 [P, 64, 640] per class: 24 ms a
  class of 250 tasks); None scores them at once."""
  def chunked(shared, group, tasks, labels, mask, chunk):
    pick = lambda rows: tf.nest.map_structure(
        lambda t: None if t is None else tf.gather(t, rows), group)
    if chunk is None:
      return score(shared, pick(tasks), labels, mask)
    split = lambda t: tf.reshape(t, tf.concat([[-1, chunk], tf.shape(t)[1:]], 0))
    hits = tf.map_fn(lambda part: score(shared, pick(part[0]), part[1], part[2]),
                     [split(tasks), split(labels), split(mask)],
                     fn_output_signature=tf.TensorSpec([chunk], tf.int64))
    return tf.reshape(hits, [-1])
  return chunked


def _hits(predictions, labels, mask):
  """Correct masked rows per task: predictions [P, R], labels [P], mask [P, R]."""
  right = tf.equal(predictions, labels[:, tf.newaxis])
  return tf.reduce_sum(tf.cast(tf.logical_and(right, mask), tf.int64), axis=1)


def evaluate_baseline(logits_fn, episodes) -> Result:
  """Scores a non-learned `logits_fn(support_x, query_x)` -> [B, N, V, N] on
  fixed `episodes` (batches of Episode), eagerly: the one scoring function of
  pretrain/baselines.py's methods."""
  return summarise(np.concatenate([
      base.accuracy(logits_fn(e.support_x, e.query_x), e.query_y).numpy() for e in episodes]))
