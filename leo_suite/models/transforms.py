"""Gradient transforms, optax style: what the inner loops of the head learners
(adaptation.adapt_loop) and the outer loop (leo_suite.training.optim) both apply.

A `Transform` is two pure functions over lists of tensors (one per
parameter):

    state = init(params)
    updates, state = update(grads, state, params, loss=loss)

`chain(t1, t2, ...)` feeds each transform's output to the next; the updates of
the last one are added to the parameters.
"""

from typing import Any, Callable, NamedTuple, Sequence

import tensorflow as tf


class Transform(NamedTuple):
  """init(params) -> state; update(grads, state, params, loss=) -> (updates, state)."""
  init: Callable[[Sequence[tf.Tensor]], Any]
  update: Callable[..., Any]


def _no_state(params):
  del params
  return ()


def _stateless(fn):
  """A Transform mapping each gradient tensor through fn (no state)."""
  def update(grads, state, params=None, loss=None):
    del params, loss
    return [fn(g) for g in grads], state
  return Transform(_no_state, update)


def clip_by_value(threshold: float) -> Transform:
  """Each element to [-threshold, threshold] (LEO's `gradient_threshold`)."""
  return _stateless(lambda g: tf.clip_by_value(g, -threshold, threshold))


def clip_by_tensor_norm(threshold: float) -> Transform:
  """Each tensor to norm <= threshold, separately (not the global norm)."""
  return _stateless(lambda g: tf.clip_by_norm(g, threshold))


def scale(factor: float) -> Transform:
  # convert_to_tensor, not cast: cast would round a Python float to float32
  # first (a float64 run's SGD rate 0.37 became 0.37000000477).
  return _stateless(lambda g: tf.convert_to_tensor(factor, g.dtype) * g)


def sgd(learning_rate: float) -> Transform:
  """updates = -learning_rate * grads."""
  return scale(-learning_rate)


def adam(learning_rate: float, beta1: float = 0.9, beta2: float = 0.999,
         epsilon: float = 1e-8) -> Transform:
  """Adam in TF1's form (tf.compat.v1.train.AdamOptimizer, as LEO's release):

  t <- t + 1; m <- b1 m + (1 - b1) g; v <- b2 v + (1 - b2) g^2;
  lr_t = lr sqrt(1 - b2^t) / (1 - b1^t); update = -lr_t m / (sqrt(v) + eps).
  State: (t int64, [m], [v]).
  """
  def init(params):
    return (tf.zeros([], tf.int64), [tf.zeros_like(p) for p in params],
            [tf.zeros_like(p) for p in params])

  def update(grads, state, params=None, loss=None):
    del params, loss
    count, moments1, moments2 = state
    count = count + 1
    new_m = [beta1 * m + (1 - beta1) * g for m, g in zip(moments1, grads)]
    new_v = [beta2 * v + (1 - beta2) * tf.square(g) for v, g in zip(moments2, grads)]
    updates = []
    for m, v in zip(new_m, new_v):
      t = tf.cast(count, m.dtype)
      rate = learning_rate * tf.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
      updates.append(-rate * m / (tf.sqrt(v) + epsilon))
    return updates, (count, new_m, new_v)

  return Transform(init, update)


def chain(*transforms: Transform) -> Transform:
  """Applies the transforms in order; the state is the tuple of their states."""
  def init(params):
    return tuple(t.init(params) for t in transforms)

  def update(grads, state, params=None, loss=None):
    new_state = []
    for transform, sub_state in zip(transforms, state):
      grads, sub_state = transform.update(grads, sub_state, params, loss=loss)
      new_state.append(sub_state)
    return grads, tuple(new_state)

  return Transform(init, update)


def scale_by_rates(rates: Sequence) -> Transform:
  """updates = -rate o grads with one rate per parameter (a scalar, or a tensor
  that broadcasts against it: Meta-SGD's learned per-element alpha); rates
  that are tensors keep their gradient path (an outer tape sees it)."""
  def update(grads, state, params=None, loss=None):
    del params, loss
    return [-(rate * g) for rate, g in zip(rates, grads)], state
  return Transform(_no_state, update)


def add_proximal(anchors: Sequence[tf.Tensor], coefficient: float) -> Transform:
  """grads + coefficient (params - anchors): the gradient of the proximal term
  coefficient / 2 ||params - anchors||^2 added (iMAML's Eq. 4)."""
  def update(grads, state, params=None, loss=None):
    del loss
    return [g + coefficient * (p - a) for g, p, a in zip(grads, params, anchors)], state
  return Transform(_no_state, update)
