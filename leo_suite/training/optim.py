"""Outer-loop optimisation: LEO's gradient pipeline and a pure Adam.

`adam_init` / `adam_update` are pure functions (optax style); `AdamState`
holds the moments as tf.Variables so they checkpoint with the model. Keeping
the optimiser ours (not Keras 3's or Sonnet's) means the same code runs on one
device, under MirroredStrategy and under MultiWorkerMirroredStrategy, with
clipping applied to the *full-batch* gradient as LEO does.
"""

from typing import List, NamedTuple

import sonnet as snt
import tensorflow as tf


class AdamHyper(NamedTuple):
  learning_rate: float
  beta1: float = 0.9
  beta2: float = 0.999
  epsilon: float = 1e-8   # tf.compat.v1.train.AdamOptimizer's default, as the release


def adam_update(grads, moments1, moments2, step, hyper: AdamHyper):
  """One Adam step. Returns (updates to add, new m, new v).

  step is the 1-based step count. Uses the TF1 form the release used:
  lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t); update = -lr_t * m / (sqrt(v) + eps).
  """
  step = tf.cast(step, grads[0].dtype)
  new_m = [hyper.beta1 * m + (1 - hyper.beta1) * g for m, g in zip(moments1, grads)]
  new_v = [hyper.beta2 * v + (1 - hyper.beta2) * tf.square(g)
           for v, g in zip(moments2, grads)]
  rate = hyper.learning_rate * tf.sqrt(1 - hyper.beta2 ** step) / (1 - hyper.beta1 ** step)
  updates = [-tf.cast(rate, m.dtype) * m / (tf.sqrt(v) + hyper.epsilon)
             for m, v in zip(new_m, new_v)]
  return updates, new_m, new_v


class AdamState(snt.Module):
  """Adam's moments for a list of variables, as checkpointable variables."""

  def __init__(self, variables, hyper: AdamHyper, name="adam"):
    super().__init__(name=name)
    self.hyper = hyper
    self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    self.m = [tf.Variable(tf.zeros_like(v), trainable=False, name="m") for v in variables]
    self.v = [tf.Variable(tf.zeros_like(v), trainable=False, name="v") for v in variables]

  def apply(self, grads, variables):
    step = self.step + 1
    updates, new_m, new_v = adam_update(grads, self.m, self.v, step, self.hyper)
    for var, update, m, m_new, v, v_new in zip(variables, updates, self.m, new_m,
                                               self.v, new_v):
      var.assign_add(update)
      m.assign(m_new)
      v.assign(v_new)
    self.step.assign(step)


def clip_gradients(grads: List[tf.Tensor], value_threshold, norm_threshold):
  """LEO's clipping: by value, then each tensor by its own norm (not global)."""
  out = []
  for g in grads:
    if value_threshold and value_threshold > 0:
      g = tf.clip_by_value(g, -value_threshold, value_threshold)
    if norm_threshold and norm_threshold > 0:
      g = tf.clip_by_norm(g, norm_threshold)
    out.append(g)
  return out


def guard_nan(loss, grads, fallback):
  """LEO's NaN guard: if loss or any gradient is non-finite, use `fallback`.

  Returns (gradients, skipped) where skipped is a bool tensor.
  """
  bad = tf.logical_not(tf.math.is_finite(loss))
  for g in grads:
    bad = tf.logical_or(bad, tf.logical_not(tf.reduce_all(tf.math.is_finite(g))))
  return [tf.where(bad, f, g) for g, f in zip(grads, fallback)], bad
