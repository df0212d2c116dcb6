"""Seeded few-shot episodes from an `EmbeddingSplit`, as a tf.data pipeline.

Task i of a stream is a pure function of (seed, i): N classes drawn without
replacement (label = position in the draw, 0..N-1), then K support and V query
images per class drawn without replacement from that class's images (classes
may hold different numbers of images, as in tieredImageNet), L2-normalised
after sampling as LEO's release does. Because a task depends only on its index,
a resumed run sees exactly the episodes an uninterrupted one would, evaluation
sets are fixed, and sharding indices across workers never duplicates a task.
"""

import dataclasses
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from leo_suite import errors
from leo_suite.data.embeddings import EmbeddingSplit


class Episode(NamedTuple):
  """A meta-batch of B few-shot tasks, each N-way K-shot with V queries per class:
  support_x [B, N, K, D], support_y [B, N, K] (int32 in 0..N-1),
  query_x [B, N, V, D], query_y [B, N, V]."""
  support_x: tf.Tensor
  support_y: tf.Tensor
  query_x: tf.Tensor
  query_y: tf.Tensor


@dataclasses.dataclass(frozen=True)
class EpisodeSpec:
  num_ways: int      # N
  num_shots: int     # K, support examples per class
  num_queries: int   # V, query examples per class

  @property
  def examples_per_class(self):
    return self.num_shots + self.num_queries


def check_spec(split: EmbeddingSplit, spec: EpisodeSpec, what: str):
  """Raises a `ConfigError` if `split` cannot supply tasks of shape `spec`."""
  source = ", ".join(split.source) or "the split"
  for name, value in (("num_ways (N)", spec.num_ways), ("num_shots (K)", spec.num_shots),
                      ("num_queries (V)", spec.num_queries)):
    if value < 1:
      raise errors.ConfigError(f"{what}: {name} = {value}, must be at least 1")
  if split.num_classes < spec.num_ways:
    raise errors.ConfigError(
        f"{source}: {what} needs {spec.num_ways} classes per task but the split "
        f"has only {split.num_classes}; lower --num_classes")
  small = np.flatnonzero(split.class_count < spec.examples_per_class)
  if small.size:
    worst = small[np.argmin(split.class_count[small])]
    raise errors.ConfigError(
        f"{source}: {what} draws K+V = {spec.num_shots}+{spec.num_queries} = "
        f"{spec.examples_per_class} images per class, but {small.size} class(es) have "
        f"fewer (class {split.class_names[worst]!r} has {split.class_count[worst]}); "
        "lower the number of support/query examples")


def smallest(keys, count):
  """Positions of the `count` smallest keys along the last axis, in order:
  tf.argsort(keys)[..., :count] exactly (ties to the lower position, as
  argsort's top_k does), without sorting the whole row (argsort of [5, 600]
  keys was 85% of a task's draw in tf.data)."""
  return tf.math.top_k(-keys, count).indices


def task_seed(seed, index):
  """The stateless seed [2] of task `index` of stream `seed`."""
  return tf.stack([tf.cast(seed, tf.int64), tf.cast(index, tf.int64)])


def all_remaining_queries(split: EmbeddingSplit, num_shots: int) -> int:
  """The release's evaluation V: every image left after K (smallest class)."""
  return int(split.class_count.min()) - num_shots


def finite(dataset: tf.data.Dataset, count) -> tf.data.Dataset:
  """`dataset` without tf.data's autotuning when it is finite (`count` set).

  Releasing an autotuned iterator at its end could block for about a second:
  2,000 fixed Matching evaluation tasks took 1.6-1.9 s or 2.62 s a pass, the
  extra time spent leaving the loop over the draws, and none of ten passes
  was slow without autotuning. AUTOTUNE parallelism and prefetch fall back to
  their static defaults. Training's endless stream keeps autotuning.
  """
  if count is None:
    return dataset
  options = tf.data.Options()
  options.autotune.enabled = False
  return dataset.with_options(options)


class EpisodeSampler:
  """Builds tf.data streams of `Episode` meta-batches from one split."""

  def __init__(self, split: EmbeddingSplit, spec: EpisodeSpec, what="episodes",
               dtype=tf.float32):
    check_spec(split, spec, what)
    self.split = split
    self.spec = spec
    self.dtype = tf.as_dtype(dtype)
    # Read-only tables; a variable is captured by reference by tf.data, so a
    # large split is not copied into the dataset graph.
    # Each row is L2-normalised once here: normalising a vector does not
    # depend on which task draws it, so this equals the release's per-task
    # normalisation after sampling and saves that work on every task.
    norms = np.linalg.norm(split.embeddings, axis=1, keepdims=True)
    self._table = tf.Variable(split.embeddings / np.maximum(norms, 1e-6),
                              trainable=False, name="embeddings")
    self._class_start = tf.constant(split.class_start, tf.int64)
    self._class_count = tf.constant(split.class_count, tf.int64)
    self._max_count = int(split.class_count.max())

  def draw(self, seed, index):
    """Which images task `index` of stream `seed` uses, without reading them:
    classes [N] (split class ids, label = position) and picks [N, K+V] (image
    positions within each class: the first K are the support, the rest the
    queries)."""
    n = self.spec.num_ways
    class_seed, image_seed = tf.unstack(
        tf.random.experimental.stateless_split(task_seed(seed, index), 2))
    num_classes = tf.shape(self._class_count)[0]
    classes = smallest(tf.random.stateless_uniform([num_classes], class_seed), n)
    counts = tf.gather(self._class_count, classes)                      # [N]
    keys = tf.random.stateless_uniform([n, self._max_count], image_seed)
    valid = tf.range(self._max_count, dtype=tf.int64)[tf.newaxis] < counts[:, tf.newaxis]
    keys = tf.where(valid, keys, 2.0)  # images a class lacks sort last
    return classes, smallest(keys, self.spec.examples_per_class)        # [N, K+V]

  def rows(self, classes, picks):
    """Table rows of `picks` [..., N, P] within `classes` [..., N]."""
    starts = tf.gather(self._class_start, classes)
    return starts[..., tf.newaxis] + tf.cast(picks, tf.int64)

  def images(self, rows):
    """The unit-norm embeddings of table `rows`, in the sampler's dtype."""
    return tf.cast(tf.gather(self._table, rows), self.dtype)

  def task_images(self, seed, index, rows):
    """The unit-norm embeddings task (seed, index) shows for table `rows`
    [N, K+V]: the rows themselves (`leo_suite.data.views` draws views instead)."""
    del seed, index
    return self.images(rows)

  def sample_task(self, seed, index):
    """Task `index` of the stream `seed`: (support_x, support_y, query_x, query_y)."""
    k = self.spec.num_shots
    classes, picks = self.draw(seed, index)
    x = self.task_images(seed, index, self.rows(classes, picks))        # [N, K+V, D], unit rows
    labels = self.labels(self.spec.examples_per_class)
    return x[:, :k], labels[:, :k], x[:, k:], labels[:, k:]

  def labels(self, per_class):
    """[N, per_class] labels: class n's examples are labelled n."""
    return tf.tile(tf.range(self.spec.num_ways, dtype=tf.int32)[:, tf.newaxis], [1, per_class])

  def class_rows(self, class_id):
    """Every unit-norm embedding of one class [count, D] (a slice of the table)."""
    start = int(self.split.class_start[class_id])
    count = int(self.split.class_count[class_id])
    # A gather reads only these rows (slicing the variable reads all of it first).
    return tf.cast(tf.gather(self._table, tf.range(start, start + count)), self.dtype)

  def drawn_supports(self, seed: int, batch_size: int, start: int = 0, count=None):
    """Batches of (classes [B, N], picks [B, N, K+V], support_x, support_y) of
    tasks start, ...: the fixed set's draws with only its support sets read."""
    k = self.spec.num_shots

    def task(index):
      classes, picks = self.draw(seed, index)
      return classes, tf.cast(picks, tf.int32)

    def supports(classes, picks):  # one gather per batch, not one per task
      support_x = self.images(self.rows(classes, picks[..., :k]))
      support_y = tf.broadcast_to(self.labels(k), tf.shape(picks[..., :k]))
      return classes, picks, support_x, support_y

    stop = None if count is None else start + count
    return finite(tf.data.Dataset.range(start, stop)
                  .map(task, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
                  .batch(batch_size).map(supports).prefetch(tf.data.AUTOTUNE), count)

  def dataset(self, seed: int, batch_size: int, start: int = 0, count=None,
              num_shards: int = 1, shard_index: int = 0):
    """Meta-batches of tasks start, start+1, ... (optionally sharded by task)."""
    stop = None if count is None else start + count
    indices = (tf.data.Dataset.range(start, stop) if stop is not None
               else tf.data.Dataset.counter(start))
    if num_shards > 1:
      indices = indices.shard(num_shards, shard_index)
    tasks = indices.map(lambda i: self.sample_task(seed, i),
                        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return finite(tasks.batch(batch_size, drop_remainder=count is None)
                  .map(lambda *t: Episode(*t))
                  .prefetch(tf.data.AUTOTUNE), count)

  def fixed_set(self, seed: int, num_tasks: int, batch_size: int):
    """A finite, fixed evaluation set: the same tasks for every model."""
    return self.dataset(seed, batch_size, start=0, count=num_tasks)
