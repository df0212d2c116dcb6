"""Hallucination (Wang et al. 2018): for EVERY base learner of the registry,
either a meta-training step moves every weight of the generator G, or the
learner refuses the base with a ConfigError naming it (derived from the
gradient graph, not a list); and the augmented support set is
S u {norm(x_s + MLP([x_s; z])), z = N(0, I) / sqrt(z_dim)} exactly, noise
scale and seeds included (numpy)."""

import math

import numpy as np
import pytest
import tensorflow as tf

from leo_suite import errors
from leo_suite.models import base
from leo_suite.models import hallucination
from leo_suite.models import registry
from tests import test_maml as common

NUM_WAYS, DIM, SEED = common.NUM_WAYS, common.DIM, common.SEED
SMALL = dict(noise_dim=4, hidden_sizes="8")
BASES = [name for name in registry.LEARNERS if name != "hallucination"]


def perturb_generator(learner, seed=3):
  rng = np.random.default_rng(seed)
  for v in learner.generator.trainable_variables:
    v.assign(v + 0.1 * rng.normal(size=v.shape))


def generator_gradients_through_meta_loss(learner, episode):
  """G's gradients through the plain meta-loss (None where no path exists)."""
  with tf.GradientTape() as tape:
    loss, _ = learner.meta_loss(episode, training=True, seed=SEED)
  return tape.gradient(loss, learner.generator.trainable_variables)


def learner_of(name):
  spec = registry.spec(name)
  return spec.build(spec.config_class(), NUM_WAYS, DIM, "float64")


@pytest.mark.parametrize("base_model", BASES)
def test_every_base_trains_the_generator_or_is_refused_by_name(base_model):
  config = hallucination.Config(base_model=base_model, num_hallucinated=2, **SMALL)
  episode = common.make_episode(num_tasks=2, num_shots=1, num_queries=2)
  tf.random.set_seed(0)   # LEO's default inner loop diverges on some draws (test_hallucination)
  try:
    learner = hallucination.build(config, NUM_WAYS, DIM, "float64")
  except errors.ConfigError as error:   # its own meta-gradient, not a loss's through the support
    assert f"base_model='{base_model}' computes its own meta-gradient" in str(error)
    assert (type(learner_of(base_model)).loss_and_gradients
            is not base.Learner.loss_and_gradients)
    return
  perturb_generator(learner)
  reaches = all(g is not None and np.abs(g.numpy()).max() > 0
                for g in generator_gradients_through_meta_loss(learner, episode))
  if not reaches:
    with pytest.raises(errors.ConfigError, match=f"base_model='{base_model}'.*generator"):
      learner.loss_and_gradients(episode, seed=SEED)
    return
  before = [v.numpy() for v in learner.generator.trainable_variables]
  _, grads, _ = learner.loss_and_gradients(episode, seed=SEED)
  for var, grad in zip(learner.trainable_variables, grads):   # one SGD step
    var.assign_sub(0.1 * grad)
  for var, old in zip(learner.generator.trainable_variables, before):
    assert np.abs(var.numpy() - old).max() > 1e-9, (base_model, var.name)


def test_the_refused_bases_are_exactly_those_that_leave_the_generator_untrained():
  """Documents the outcome of the test above: iMAML and Reptile (their own
  meta-gradients) and Meta-LSTM (support read through stop_gradient)."""
  refused = []
  episode = common.make_episode(num_tasks=1, num_shots=1, num_queries=1)
  for base_model in ("imaml", "reptile", "meta_lstm", "protonet"):
    try:
      learner = hallucination.build(
          hallucination.Config(base_model=base_model, num_hallucinated=1, **SMALL),
          NUM_WAYS, DIM, "float64")
      learner.loss_and_gradients(episode, seed=SEED)
    except errors.ConfigError as error:
      assert "generator would not be trained" in str(error)
      refused.append(base_model)
  assert refused == ["imaml", "reptile", "meta_lstm"]


def test_a_refused_base_without_generated_examples_is_its_base_learner():
  learner = hallucination.build(
      hallucination.Config(base_model="meta_lstm", num_hallucinated=0, **SMALL),
      NUM_WAYS, DIM, "float64")
  loss, _, _ = learner.loss_and_gradients(common.make_episode(num_shots=1), seed=SEED)
  assert np.isfinite(float(loss))


def numpy_generator(learner, seeds_x, z):
  h = np.concatenate([seeds_x, np.broadcast_to(z, seeds_x.shape[:3] + z.shape[-1:])], -1)
  layers = [p.numpy() for p in learner.generator.params]
  for i in range(0, len(layers), 2):
    h = h @ layers[i] + layers[i + 1]
    if i + 2 < len(layers):
      h = np.maximum(h, 0.0)
  out = seeds_x + h
  return out / np.linalg.norm(out, axis=-1, keepdims=True)


@pytest.mark.parametrize("training", [True, False])
def test_augmented_support_is_generated_from_unit_variance_noise_over_sqrt_z_dim(training):
  """z = N(0, I) / sqrt(z_dim) (||z|| ~ 1, like the unit-norm seed): in
  training from the step's seed folded with NOISE_STREAM, at evaluation from
  EVAL_NOISE_SEED, one draw shared by every task."""
  generated, noise_dim = 3, 4
  learner = hallucination.build(
      hallucination.Config(num_hallucinated=generated, **SMALL), NUM_WAYS, DIM, "float64")
  perturb_generator(learner)
  episode = common.make_episode(num_tasks=2, num_shots=2)
  x, y = learner.augment(episode.support_x, episode.support_y, training=training, seed=SEED)
  if training:
    z = hallucination.standard_normal(
        tf.constant([2, NUM_WAYS, generated, noise_dim]),
        tf.random.experimental.stateless_fold_in(SEED, hallucination.NOISE_STREAM), tf.float64)
  else:
    z = hallucination.standard_normal(tf.constant([1, NUM_WAYS, generated, noise_dim]),
                                      tf.constant(hallucination.EVAL_NOISE_SEED), tf.float64)
  z = z.numpy() / math.sqrt(noise_dim)
  seeds = episode.support_x.numpy()[:, :, np.arange(generated) % 2]
  np.testing.assert_allclose(x.numpy()[:, :, 2:], numpy_generator(learner, seeds, z),
                             rtol=1e-12, atol=1e-12)
  np.testing.assert_array_equal(x.numpy()[:, :, :2], episode.support_x.numpy())
  np.testing.assert_array_equal(y.numpy()[:, :, 2:],
                                episode.support_y.numpy()[:, :, np.arange(generated) % 2])
