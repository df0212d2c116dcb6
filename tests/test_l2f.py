"""L2F: the attenuation gamma (range, init, what it scales, stop_gradient on
the task embedding), exact reduction to MAML at gamma = 1, and the checks
every learner must pass."""

import numpy as np
import pytest
import tensorflow as tf

from leo_suite import errors
from leo_suite.models import adaptation
from leo_suite.models import base
from leo_suite.models import l2f
from leo_suite.models import maml
from tests import test_maml as common

NUM_WAYS, DIM, SEED = common.NUM_WAYS, common.DIM, common.SEED


def build64(**overrides):
  return l2f.build(l2f.Config(**overrides), NUM_WAYS, DIM, "float64")


def randomise_biases(learner, seed=0):
  """Non-zero biases, so that scaling them is observable."""
  rng = np.random.default_rng(seed)
  for p in learner.head.params[1::2]:
    p.assign(tf.constant(0.5 * rng.normal(size=p.shape), p.dtype))


def test_gamma_is_in_unit_interval_near_half_at_init_one_per_tensor():
  learner = build64()  # default MLP head: W_1, b_1, W_2, b_2
  assert len(learner.head.params) == 4
  episode = common.make_episode(num_tasks=4)
  gamma = learner.attenuation(episode.support_x, episode.support_y).numpy()
  assert gamma.shape == (4, 4)
  assert np.all((gamma > 0) & (gamma < 1))
  # PyTorch-style init: near 0.5, but not exactly (non-zero biases).
  assert np.all(np.abs(gamma - 0.5) < 0.25)
  assert np.std(gamma[0]) > 1e-3
  # Large task embeddings saturate but stay strictly inside (0, 1) in float64.
  saturated = learner.attenuator(tf.constant([[30.0, -30.0, 30.0, -30.0]],
                                             tf.float64)).numpy()
  assert np.all((saturated > 0) & (saturated < 1))


def test_attenuator_init_is_pytorch_linear_default_without_dead_units():
  # Seeded: the signs checked below hold for most draws, not all (b_2 has few
  # entries), and the global state depends on which tests ran before.
  tf.random.set_seed(1)
  attenuator = l2f.Attenuator(4, dtype=tf.float64)
  bound = 1.0 / np.sqrt(4)
  for v in attenuator.trainable_variables:
    values = v.numpy()
    assert np.all(np.abs(values) <= bound)
    assert np.std(values) > 0.1 * bound  # biases too are random, not zero
  assert np.all(attenuator.b_1.numpy() > 0)
  assert np.any(attenuator.w_1.numpy() < 0) and np.any(attenuator.b_2.numpy() < 0)
  # Every hidden unit is active on real task embeddings, so all get gradients.
  learner = build64()
  episode = common.make_episode(num_tasks=4)
  g = learner.task_embedding(episode.support_x, episode.support_y)
  hidden = g @ learner.attenuator.w_1 + learner.attenuator.b_1
  assert np.all(hidden.numpy() > 0)
  # The init follows TF's global seed (the runner's --seed): the same seed
  # gives the same attenuator, another seed another one.
  def attenuator_at(seed):
    tf.random.set_seed(seed)
    return [v.numpy() for v in l2f.Attenuator(4, dtype=tf.float64).trainable_variables]
  for a, b in zip(attenuator_at(3), attenuator_at(3)):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(attenuator_at(3)[0], attenuator_at(4)[0])


def test_task_embedding_is_layerwise_mean_support_gradient_under_stop_gradient():
  learner = build64()
  randomise_biases(learner)
  episode = common.make_episode()
  support_x = episode.support_x
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(support_x)
    embedding = learner.task_embedding(support_x, episode.support_y)
  # Value: mean over elements of dL_support/dtheta_l at theta, per task.
  _, grads = adaptation.loss_gradients(
      learner.support_loss_fn(support_x, episode.support_y),
      learner.head.tiled(3))
  expected = np.stack([g.numpy().reshape(3, -1).mean(1) for g in grads], 1)
  np.testing.assert_allclose(embedding.numpy(), expected, rtol=1e-10,
                             atol=1e-16)
  # Constant for the outer loop: no gradient to theta or to the inputs.
  for target in learner.head.params + [support_x]:
    assert tape.gradient(embedding, target) is None


def test_output_layer_task_embedding_is_identically_zero():
  """Softmax rows of dL/dlogits sum to 0: only hidden layers inform gamma."""
  episode = common.make_episode(num_tasks=4)
  learner = build64(hidden_sizes="8")
  randomise_biases(learner)
  g = learner.task_embedding(episode.support_x, episode.support_y).numpy()
  np.testing.assert_allclose(g[:, 2:], 0.0, atol=1e-15)
  assert np.all(np.abs(g[:, :2]) > 1e-6)
  assert np.std(g[:, 0]) > 1e-6  # differs between tasks
  linear = build64(hidden_sizes="")
  g = linear.task_embedding(episode.support_x, episode.support_y).numpy()
  np.testing.assert_allclose(g, 0.0, atol=1e-15)


def test_meta_gradient_treats_the_task_embedding_as_a_constant():
  learner = build64(hidden_sizes="8", inner_steps=2)
  randomise_biases(learner)
  episode = common.make_episode()
  _, grads, _ = learner.loss_and_gradients(episode, seed=SEED)
  # Recompute the meta-loss with g fed in as a numpy constant.
  embedding = tf.constant(
      learner.task_embedding(episode.support_x, episode.support_y).numpy())
  variables = learner.trainable_variables
  with tf.GradientTape() as tape:
    start = l2f.attenuate(learner.head.tiled(3), learner.attenuator(embedding))
    adapted = maml.inner_loop(
        learner.support_loss_fn(episode.support_x, episode.support_y), start,
        learner.config.inner_lr, learner.config.inner_steps)
    logits = learner.predict(adapted, episode.query_x, training=True, seed=SEED)
    loss = tf.reduce_mean(base.cross_entropy(logits, episode.query_y))
  for g, expected in zip(grads, tape.gradient(loss, variables)):
    np.testing.assert_allclose(g.numpy(), expected.numpy(), rtol=1e-9,
                               atol=1e-14)


def test_gamma_scales_weights_and_biases():
  learner = build64()
  randomise_biases(learner)
  episode = common.make_episode()
  gamma = learner.attenuation(episode.support_x, episode.support_y).numpy()
  start = learner.initial_fast_weights(episode.support_x, episode.support_y)
  for index, (param, scaled) in enumerate(zip(learner.head.params, start)):
    for task in range(3):
      np.testing.assert_allclose(scaled[task].numpy(),
                                 gamma[task, index] * param.numpy(), rtol=1e-14)
    assert np.max(np.abs(param.numpy())) > 0  # weights and biases both scaled


@pytest.mark.parametrize("hidden_sizes", ["", "8"])
def test_gamma_one_reproduces_maml_exactly(hidden_sizes):
  learner = build64(hidden_sizes=hidden_sizes)
  reference = common.build64(hidden_sizes=hidden_sizes,
                             eval_inner_steps=learner.config.eval_inner_steps)
  common.perturb_variables(reference, seed=4)
  for mine, theirs in zip(learner.head.params, reference.head.params):
    mine.assign(theirs)
  # sigmoid(50) rounds to exactly 1.0 in float64.
  learner.attenuator.w_2.assign(tf.zeros_like(learner.attenuator.w_2))
  learner.attenuator.b_2.assign(tf.fill(learner.attenuator.b_2.shape,
                                        tf.constant(50.0, tf.float64)))
  episode = common.make_episode()
  np.testing.assert_array_equal(
      learner.attenuation(episode.support_x, episode.support_y).numpy(), 1.0)
  for training in (True, False):
    ours = learner.adapt(episode.support_x, episode.support_y,
                         training=training, seed=SEED)
    theirs = reference.adapt(episode.support_x, episode.support_y,
                             training=training, seed=SEED)
    for a, b in zip(ours, theirs):
      np.testing.assert_array_equal(a.numpy(), b.numpy())
  # ...and with the learned (default) attenuation it is not MAML.
  default = build64(hidden_sizes=hidden_sizes)
  for mine, theirs in zip(default.head.params, reference.head.params):
    mine.assign(theirs)
  ours = default.adapt(episode.support_x, episode.support_y, training=True,
                       seed=SEED)
  assert not np.allclose(ours[0].numpy(), theirs[0].numpy())


def test_adaptation_lowers_the_support_loss():
  common.check_adaptation_lowers_support_loss(build64())


def test_evaluation_is_deterministic():
  common.check_evaluation_is_deterministic(build64())


def test_checkpoint_round_trip_restores_identical_predictions(tmp_path):
  common.check_checkpoint_round_trip(build64, tmp_path)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_runs_in_tf_function_with_finite_loss_and_gradients(jit_compile):
  learner = l2f.build(l2f.Config(hidden_sizes="32"), NUM_WAYS, DIM, "float32")
  common.check_finite_loss_and_gradients_in_tf_function(learner, jit_compile)
  names = {v.name.split(":")[0].split("/")[-1]
           for v in learner.attenuator.trainable_variables}
  assert names == {"w_1", "b_1", "w_2", "b_2"}
  assert len(learner.trainable_variables) == 4 + 4


def test_bad_config_names_l2f_flags():
  with pytest.raises(errors.ConfigError, match="--l2f_inner_lr=-1.0"):
    build64(inner_lr=-1.0)
  with pytest.raises(errors.ConfigError, match="--l2f_hidden_sizes"):
    build64(hidden_sizes="12,,3")


def test_config_defaults_to_an_mlp_head_and_has_help():
  assert l2f.Config().hidden_sizes == "64"
  for name, _, help_text in base.config_fields(l2f.Config):
    assert len(help_text) > 20, name


def test_zero_output_layer_would_silence_the_task_embedding():
  """Why L2F keeps head_init='glorot': with W_out = 0 no gradient reaches the
  hidden layers at theta, so g = 0 for every task (gamma task-independent)."""
  episode = common.make_episode()
  zeros = build64(hidden_sizes="8", head_init="zeros")
  g = zeros.task_embedding(episode.support_x, episode.support_y).numpy()
  np.testing.assert_array_equal(g[:, :2], 0.0)  # hidden layer: exactly 0
  np.testing.assert_allclose(g, 0.0, atol=1e-15)  # output: 0 up to rounding
  assert l2f.Config().head_init == "glorot"
  glorot = build64(hidden_sizes="8")
  randomise_biases(glorot)
  g = glorot.task_embedding(episode.support_x, episode.support_y).numpy()
  assert np.abs(g[:, :2]).min() > 1e-9  # hidden layer: task-dependent


def test_meta_trained_l2f_is_near_the_class_mean_baseline(tmp_path):
  tf.random.set_seed(0)   # the initialisation follows the seed, as in the runner
  learner = l2f.build(l2f.Config(), NUM_WAYS, DIM, "float32")
  accuracy, ncm, _ = common.meta_train_and_score(learner, tmp_path)
  assert ncm > 0.5
  assert accuracy >= ncm - 0.03, (accuracy, ncm)
