"""Support sets and the adapt / predict functions export, predict and REST share.

A `SupportSet` is N named classes x K raw embeddings (`support_from_groups`
checks it); `adapt_support` / `query_logits` L2-normalise raw embeddings
(`normalise`) and adapt and apply a learner in eval mode with the zero seed,
as evaluation does: the exported SavedModel's graph and
`leo_suite.serving.predict` call the very same functions.
"""

import dataclasses
from typing import Dict, Tuple

import numpy as np
import tensorflow as tf

from leo_suite import errors
from leo_suite import safeio


@dataclasses.dataclass(frozen=True)
class SupportSet:
  """N named classes with K raw (unnormalised) embeddings each."""
  class_names: Tuple[str, ...]
  embeddings: np.ndarray      # float32 [N, K, D]
  origin: str

  @property
  def num_ways(self):
    return int(self.embeddings.shape[0])

  @property
  def num_shots(self):
    return int(self.embeddings.shape[1])

  @property
  def dim(self):
    return int(self.embeddings.shape[2])


def check_shots(counts: Dict[str, int], origin: str, num_shots: int = 0) -> int:
  """Returns K for {class: number of examples}; raises on empty/unequal classes.

  Every class needs at least one example and all classes the same count,
  unless `num_shots` > 0, which keeps the first `num_shots` of each class.
  """
  if not counts:
    raise errors.DataError(f"{origin}: the support set has no classes")
  names = sorted(counts)
  empty = [n for n in names if counts[n] == 0]
  if empty:
    raise errors.DataError(
        f"{origin}: class {empty[0]!r} has no support examples; every class "
        "needs at least one (remove the class or add examples)")
  if num_shots < 0:
    raise errors.ConfigError(f"--num_shots={num_shots}: must be >= 0 (0 = all)")
  if num_shots:
    short = [n for n in names if counts[n] < num_shots]
    if short:
      raise errors.DataError(
          f"{origin}: --num_shots={num_shots} but class {short[0]!r} has only "
          f"{counts[short[0]]} example(s); lower --num_shots to at most "
          f"{min(counts.values())}")
    return num_shots
  if len(set(counts.values())) > 1:
    few, many = min(names, key=counts.get), max(names, key=counts.get)
    raise errors.DataError(
        f"{origin}: unequal shots: class {few!r} has {counts[few]} examples and "
        f"{many!r} has {counts[many]}; the learners adapt on an [N, K, D] support "
        "tensor and need the same K for every class. Pass "
        f"--num_shots={counts[few]} to use the first {counts[few]} of each class")
  return counts[names[0]]


def check_ways(class_names, num_ways: int, origin: str, learner: str = "the learner"):
  """Refuses a support set whose number of classes is not the learner's N."""
  if len(class_names) != num_ways:
    raise errors.DataError(
        f"{origin}: the support set has {len(class_names)} classes but {learner} is "
        f"{num_ways}-way; give exactly {num_ways} classes (given: "
        f"{safeio.listed(sorted(class_names))})")


def support_from_groups(groups: Dict[str, np.ndarray], origin: str,
                        num_shots: int = 0) -> SupportSet:
  """{class name: [count, D] embeddings} -> SupportSet (classes sorted by name).

  Every class needs at least one example and all classes the same count,
  unless `num_shots` > 0, which keeps the first `num_shots` of each class.
  """
  names = sorted(groups)
  counts = {n: len(groups[n]) for n in names}
  k = check_shots(counts, origin, num_shots)
  stacked = np.stack([np.asarray(groups[n], np.float32)[:k] for n in names])
  if stacked.ndim != 3 or stacked.shape[2] == 0:
    raise errors.DataError(f"{origin}: expected [count, D] embeddings per class, "
                           f"got {stacked.shape}")
  if not np.isfinite(stacked).all():
    raise errors.DataError(f"{origin}: the support embeddings contain NaN or inf")
  zero = np.argwhere(~stacked.any(axis=-1))
  if len(zero):
    raise errors.DataError(
        f"{origin}: support example {zero[0][1]} of class {names[zero[0][0]]!r} is all "
        "zeros: it has no direction to L2-normalise; remove it or re-extract it")
  return SupportSet(tuple(names), stacked, origin)


# -- the adaptation graph's functions ---------------------------------------------
def checked_batch(x, name: str):
  """`x` once asserted to hold at least one row (else InvalidArgumentError)."""
  check = tf.debugging.Assert(tf.shape(x)[0] > 0, [
      f"{name} is an empty batch: send at least one row"])
  with tf.control_dependencies([check]):
    return tf.identity(x)


def checked_embeddings(x, name: str):
  """`x` [batch, D] once asserted non-empty, finite, without denormal values and with
  no all-zero row (else InvalidArgumentError)."""
  x = checked_batch(x, name)
  x = tf.debugging.assert_all_finite(
      x, f"{name} must be finite: found NaN or inf; send the raw backbone features")
  bits = tf.bitcast(tf.cast(x, tf.float32), tf.int32)   # integers: no flush-to-zero
  denormal = tf.logical_and(tf.equal(tf.bitwise.bitwise_and(bits, 0x7F800000), 0),
                            tf.not_equal(tf.bitwise.bitwise_and(bits, 0x007FFFFF), 0))
  finite_size = tf.debugging.Assert(tf.logical_not(tf.reduce_any(denormal)), [
      f"{name} holds a denormal (subnormal) value, non-zero but of magnitude below "
      f"{np.finfo(np.float32).tiny:.4g}, which float32 cannot compute with; send the raw "
      "backbone features, with such values as 0. First such row:",
      tf.argmax(tf.cast(tf.reduce_any(denormal, axis=-1), tf.int32), output_type=tf.int32)])
  nonzero = tf.reduce_any(tf.not_equal(x, 0.0), axis=-1)
  direction = tf.debugging.Assert(tf.reduce_all(nonzero), [
      f"{name} has an all-zero row, which has no direction to L2-normalise; send "
      "the raw, non-zero backbone features. First zero row:",
      tf.argmin(tf.cast(nonzero, tf.int32), output_type=tf.int32)])
  with tf.control_dependencies([finite_size, direction]):
    return tf.identity(x)


def normalise(embeddings, dtype=tf.float32):
  """Rows L2-normalised in float32, then cast to `dtype`, as the training sampler does.

  Rows are divided by their largest magnitude first, so the norm neither
  overflows (1e38) nor underflows (1e-38); all-zero rows stay zero.
  (`AdaptedClassifier` and `leo_suite.serving.predict` both call it.)
  """
  x = tf.cast(embeddings, tf.float32)
  x = tf.math.divide_no_nan(x, tf.reduce_max(tf.abs(x), axis=-1, keepdims=True))
  return tf.cast(tf.math.l2_normalize(x, axis=-1), dtype)


def adapt_support(learner, support_embeddings):
  """Adapted task state of `learner` on raw support embeddings [N, K, D] (eval mode)."""
  support_x = normalise(support_embeddings, learner.dtype)[tf.newaxis]
  n, k = support_x.shape[1], support_x.shape[2]
  support_y = tf.tile(tf.range(n, dtype=tf.int32)[:, tf.newaxis], [1, k])[tf.newaxis]
  return learner.adapt(support_x, support_y, training=False, seed=tf.zeros([2], tf.int32))


def query_logits(learner, state, embeddings):
  """Raw query embeddings [batch, D] -> float32 logits [batch, N] of an adapted state."""
  queries = normalise(embeddings, learner.dtype)[tf.newaxis, tf.newaxis]   # [1, 1, batch, D]
  logits = learner.predict(state, queries, training=False, seed=tf.zeros([2], tf.int32))
  return tf.cast(tf.reshape(logits, [-1, learner.num_ways]), tf.float32)
