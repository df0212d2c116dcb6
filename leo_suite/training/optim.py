"""The outer-loop update: a chain of gradient transforms (optax style,
leo_suite.models.transforms: the ones the inner loops use) behind a NaN guard.
`OptimizerState` keeps a chain's state in checkpointable tf.Variables and
applies one step.

Each learner names its chain's defaults (`OuterConfig`, the learner spec's
`outer_defaults`): LEO's release uses

    chain(nan_guard, clip_by_value(0.1), clip_by_tensor_norm(0.1), adam(1e-4))

The NaN guard comes in two forms:
  skip     a step whose loss or gradient is not finite changes nothing: the
           updates are -0.0 (x + -0.0 == x bit for bit, for every x) and the
           state of everything after the guard is kept; the guard counts it.
  release  LEO's release: its guard zips two lists the wrong way round, so the
           "gradient" it feeds on to clipping and Adam is the variables
           themselves (Adam's moments and step count move).
"""

import dataclasses
from typing import List, Sequence

import sonnet as snt
import tensorflow as tf

from leo_suite import errors
from leo_suite.models import transforms

OPTIMIZERS = ("adam", "sgd")
NAN_GUARDS = ("skip", "release")


def all_finite(loss, grads):
  """True iff the loss and every gradient element are finite (a bool tensor)."""
  finite = tf.reduce_all(tf.math.is_finite(loss))
  for g in grads:
    finite = tf.logical_and(finite, tf.reduce_all(tf.math.is_finite(g)))
  return finite


def skip_non_finite(inner: transforms.Transform) -> transforms.Transform:
  """Runs `inner` unless the loss or a gradient is non-finite; then skips.

  A skipped step returns updates of -0.0 (adding them leaves every variable
  bit-identical) and `inner`'s unchanged state. State: (skipped count, inner).
  """
  def init(params):
    return (tf.zeros([], tf.int64), inner.init(params))

  def update(grads, state, params=None, loss=None):
    skipped, inner_state = state
    finite = all_finite(loss, grads)
    safe = [tf.where(finite, g, tf.zeros_like(g)) for g in grads]
    updates, new_inner = inner.update(safe, inner_state, params, loss=loss)
    updates = [tf.where(finite, u, tf.fill(tf.shape(u), tf.constant(-0.0, u.dtype)))
               for u in updates]
    new_inner = tf.nest.map_structure(lambda new, old: tf.where(finite, new, old),
                                      new_inner, inner_state)
    return updates, (skipped + tf.cast(tf.logical_not(finite), tf.int64), new_inner)

  return transforms.Transform(init, update)


def release_nan_fallback(inner: transforms.Transform) -> transforms.Transform:
  """LEO's release guard: a non-finite step feeds the variables to `inner`."""
  def init(params):
    return (tf.zeros([], tf.int64), inner.init(params))

  def update(grads, state, params=None, loss=None):
    skipped, inner_state = state
    finite = all_finite(loss, grads)
    grads = [tf.where(finite, g, tf.convert_to_tensor(p)) for g, p in zip(grads, params)]
    updates, inner_state = inner.update(grads, inner_state, params, loss=loss)
    return updates, (skipped + tf.cast(tf.logical_not(finite), tf.int64), inner_state)

  return transforms.Transform(init, update)


@dataclasses.dataclass(frozen=True)
class OuterConfig:
  """What a meta-training step does with the meta-gradient.

  Fields map to the runner's flags --outer_optimizer, --outer_lr,
  --adam_epsilon, --gradient_threshold, --gradient_norm_threshold and
  --nan_guard. A threshold of 0 switches that clipping off.
  """
  optimizer: str = "adam"
  learning_rate: float = 1e-4
  adam_epsilon: float = 1e-8
  clip_value: float = 0.1
  clip_norm: float = 0.1
  nan_guard: str = "skip"

  def validate(self):
    if self.optimizer not in OPTIMIZERS:
      raise errors.ConfigError(
          f"--outer_optimizer={self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    if self.nan_guard not in NAN_GUARDS:
      raise errors.ConfigError(
          f"--nan_guard={self.nan_guard!r}: choose one of {', '.join(NAN_GUARDS)}")
    if not self.learning_rate > 0:
      raise errors.ConfigError(f"--outer_lr={self.learning_rate}: must be positive")
    if not self.adam_epsilon > 0:
      raise errors.ConfigError(f"--adam_epsilon={self.adam_epsilon}: must be positive")
    for flag, value in (("gradient_threshold", self.clip_value),
                        ("gradient_norm_threshold", self.clip_norm)):
      if not value >= 0:
        raise errors.ConfigError(f"--{flag}={value}: must be >= 0 (0 = no clipping)")
    return self


def build_chain(config: OuterConfig) -> transforms.Transform:
  """The guard, the clipping the config asks for, then the optimizer."""
  config.validate()
  steps = []
  if config.clip_value > 0:
    steps.append(transforms.clip_by_value(config.clip_value))
  if config.clip_norm > 0:
    steps.append(transforms.clip_by_tensor_norm(config.clip_norm))
  steps.append(transforms.adam(config.learning_rate, epsilon=config.adam_epsilon)
               if config.optimizer == "adam" else transforms.sgd(config.learning_rate))
  guard = skip_non_finite if config.nan_guard == "skip" else release_nan_fallback
  return guard(transforms.chain(*steps))


def _skip_count(state):
  return state[0]


class OptimizerState(snt.Module):
  """A chain's state as tf.Variables (checkpointed with the model), and apply().

  Built under the strategy's scope (as the learner), so under MirroredStrategy
  the state is mirrored and every replica applies the same update.
  """

  def __init__(self, transform: transforms.Transform, variables: Sequence[tf.Variable],
               name="outer_optimizer"):
    super().__init__(name=name)
    self.transform = transform
    initial = transform.init([tf.convert_to_tensor(v) for v in variables])
    self.state = tf.nest.map_structure(
        lambda t: tf.Variable(t, trainable=False, name="state"), initial)
    self._flat_state: List[tf.Variable] = tf.nest.flatten(self.state)

  @property
  def num_skipped(self):
    """Steps the NaN guard skipped (or replaced, in release mode) so far."""
    return _skip_count(self.state)

  def apply(self, loss, grads, variables):
    """One update of `variables` from `grads`; returns whether it was finite."""
    params = [tf.convert_to_tensor(v) for v in variables]
    current = tf.nest.map_structure(tf.convert_to_tensor, self.state)
    updates, new_state = self.transform.update(list(grads), current, params, loss=loss)
    for var, update in zip(variables, updates):
      var.assign_add(update)
    for var, value in zip(self._flat_state, tf.nest.flatten(new_state)):
      var.assign(value)
    return all_finite(loss, grads)
