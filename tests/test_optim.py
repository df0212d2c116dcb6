"""The outer chain: hand-computed clipping, TF1 Adam, the two NaN guards, per-learner defaults."""

import numpy as np
import pytest
import tensorflow as tf

from leo_suite import errors
from leo_suite.models import registry
from leo_suite.models import transforms
from leo_suite.training import optim
from leo_suite.training import settings as settings_lib


def test_clip_by_value_then_per_tensor_norm_matches_hand_computed_values():
  grads = [tf.constant([0.3, -0.05, 0.02], tf.float64), tf.constant([[0.01, -0.2]], tf.float64)]
  clip = transforms.chain(transforms.clip_by_value(0.1), transforms.clip_by_tensor_norm(0.1))
  out, _ = clip.update(grads, clip.init(grads))
  # Tensor 1: by value -> [0.1, -0.05, 0.02], norm sqrt(0.0129) = 0.11358 > 0.1.
  norm = np.sqrt(0.1 ** 2 + 0.05 ** 2 + 0.02 ** 2)
  np.testing.assert_allclose(out[0].numpy(), np.array([0.1, -0.05, 0.02]) * 0.1 / norm,
                             rtol=1e-12)
  # Tensor 2: by value -> [0.01, -0.1], norm 0.1005 > 0.1: scaled on its own norm,
  # not the global one.
  norm = np.sqrt(0.01 ** 2 + 0.1 ** 2)
  np.testing.assert_allclose(out[1].numpy(), np.array([[0.01, -0.1]]) * 0.1 / norm, rtol=1e-12)
  # Below both thresholds nothing changes.
  small = [tf.constant([0.03, -0.04], tf.float64)]
  np.testing.assert_array_equal(clip.update(small, clip.init(small))[0][0].numpy(), [0.03, -0.04])


def test_adam_is_tf1_adam():
  """Three steps against tf.compat.v1.train.AdamOptimizer (the release's)."""
  start = np.array([0.5, -1.0, 2.0])
  grads = [np.array([0.1, -0.3, 0.2]), np.array([-0.2, 0.1, 0.0]), np.array([0.4, 0.4, -0.1])]
  adam = transforms.adam(0.01, epsilon=1e-3)  # large enough that its placement matters
  params = [tf.constant(start)]
  state = adam.init(params)
  for g in grads:
    updates, state = adam.update([tf.constant(g)], state, params)
    params = [params[0] + updates[0]]
  var = tf.Variable(start)
  reference = tf.compat.v1.train.AdamOptimizer(0.01, epsilon=1e-3)
  for g in grads:
    reference.apply_gradients([(tf.constant(g), var)])
  np.testing.assert_allclose(params[0].numpy(), var.numpy(), rtol=1e-7)  # its float32 lr
  assert int(state[0]) == 3


def _state_values(state):
  """The bytes of the chain's state after the guard (the guard's own counter aside)."""
  return [v.numpy().tobytes() for v in tf.nest.flatten(state.state[1])]


def test_skip_guard_leaves_variables_and_slots_bit_identical():
  variables = [tf.Variable([1.0, -0.0, 3.0]), tf.Variable([[2.0]])]
  state = optim.OptimizerState(optim.build_chain(optim.OuterConfig(learning_rate=0.1)),
                               variables)
  good = [tf.constant([0.5, 0.5, -0.5]), tf.constant([[0.1]])]
  state.apply(tf.constant(1.0), good, variables)
  before = [v.numpy().tobytes() for v in variables], _state_values(state)
  for loss, grads in ((tf.constant(np.nan), good),
                      (tf.constant(1.0), [tf.constant([np.inf, 0.0, 0.0]), good[1]]),
                      (tf.constant(1.0), [good[0], tf.constant([[np.nan]])])):
    finite = state.apply(loss, grads, variables)
    assert not bool(finite)
    assert ([v.numpy().tobytes() for v in variables], _state_values(state)) == before
  assert int(state.num_skipped.numpy()) == 3
  # The next finite step moves again, from where it was.
  state.apply(tf.constant(1.0), good, variables)
  assert [v.numpy().tobytes() for v in variables] != before[0]


def test_release_guard_feeds_the_variables_to_the_chain():
  variables = [tf.Variable([1.0, -2.0])]
  config = optim.OuterConfig(learning_rate=0.1, clip_value=0.0, clip_norm=0.0,
                             nan_guard="release")
  state = optim.OptimizerState(optim.build_chain(config), variables)
  state.apply(tf.constant(np.nan), [tf.constant([0.0, 0.0])], variables)
  # Adam's first step with g = w: m = 0.1 w, v = 0.001 w^2, lr_t = 0.1 sqrt(0.001)/0.1,
  # update = -lr_t m / (sqrt(v) + eps) = -0.1 sign(w) (up to eps).
  np.testing.assert_allclose(variables[0].numpy(), [0.9, -1.9], rtol=1e-6)
  assert int(state.num_skipped.numpy()) == 1


def test_sgd_chain_and_config_validation():
  variables = [tf.Variable([1.0, 2.0])]
  config = optim.OuterConfig(optimizer="sgd", learning_rate=0.5, clip_value=0.0,
                             clip_norm=0.0)
  state = optim.OptimizerState(optim.build_chain(config), variables)
  state.apply(tf.constant(0.0), [tf.constant([0.2, -0.4])], variables)
  np.testing.assert_allclose(variables[0].numpy(), [0.9, 2.2])
  for bad, match in ((dict(optimizer="rmsprop"), "--outer_optimizer"),
                     (dict(nan_guard="intended"), "--nan_guard='intended'"),
                     (dict(learning_rate=0.0), "--outer_lr"),
                     (dict(clip_value=-1.0), "--gradient_threshold")):
    with pytest.raises(errors.ConfigError, match=match):
      optim.OuterConfig(**bad).validate()


@pytest.mark.parametrize("model, expected", [
    ("leo", dict(outer_lr=1e-4, gradient_threshold=0.1, gradient_norm_threshold=0.1,
                 adam_epsilon=1e-8)),
    ("maml", dict(outer_lr=1e-3, gradient_threshold=10.0, gradient_norm_threshold=0.0)),
    ("imaml", dict(outer_lr=1e-3, adam_epsilon=1e-3, gradient_threshold=0.0)),
    ("r2d2", dict(outer_lr=5e-3, gradient_threshold=0.0, gradient_norm_threshold=0.0)),
    ("l2f", dict(outer_lr=1e-3, gradient_threshold=10.0)),
])
def test_each_learner_names_its_reference_chain(model, expected):
  defaults = settings_lib.outer_defaults(model)
  for name, value in expected.items():
    assert defaults[name] == value, name
  assert defaults["nan_guard"] == "skip" and defaults["outer_optimizer"] == "adam"


@pytest.mark.parametrize("model, bad, flag", [
    ("leo", dict(num_latents=0), "--num_latents"),
    ("maml", dict(eval_inner_steps=-1), "--maml_eval_inner_steps"),
    ("imaml", dict(lam=0.0), "--imaml_lam"),
    ("l2f", dict(head_init="ones"), "--l2f_head_init"),
    ("r2d2", dict(lambda_init=0.0), "--r2d2_lambda_init"),
])
def test_every_config_validates_itself_when_the_registry_builds_it(model, bad, flag):
  config = registry.spec(model).config_class(**bad)
  with pytest.raises(errors.ConfigError, match=flag):
    registry.build(model, config, 5, 8)
