"""The head learners' update rules against numpy transcriptions (linear head,
float64): MAML / Meta-SGD's theta'_T and its second-order meta-gradient by
central differences through the whole adaptation; Reptile's outer
"gradient" theta - mean_b U^k_b(theta) on the support (and, by default, the
query) examples, and the query loss it reports."""

import numpy as np
import pytest
import tensorflow as tf

from leo_suite.models import maml
from leo_suite.models import reptile
from tests import test_eq_meta_lstm as transcription
from tests import test_maml as common

NUM_WAYS, DIM, SEED = common.NUM_WAYS, common.DIM, common.SEED
mean_ce_and_gradient = transcription.mean_ce_and_gradient


def flat_head(learner):
  w, b = learner.head.params
  return np.concatenate([w.numpy().reshape(-1), b.numpy()])


def set_head(learner, seed):
  rng = np.random.default_rng(seed)
  for p in learner.head.params:
    p.assign(0.3 * rng.normal(size=p.shape))


def sgd(theta, rates, x, y, steps):
  """theta [B, P] after `steps` steps theta <- theta - rates o grad mean CE."""
  for _ in range(steps):
    _, grad = mean_ce_and_gradient(theta, x, y)
    theta = theta - rates * grad
  return theta


@pytest.mark.parametrize("meta_sgd", [False, True])
def test_maml_adaptation_and_second_order_meta_gradient_by_numpy(meta_sgd):
  steps, alpha = 2, 0.8
  learner = maml.build(maml.Config(hidden_sizes="", inner_steps=steps, inner_lr=alpha,
                                   meta_sgd=meta_sgd), NUM_WAYS, DIM, "float64")
  set_head(learner, 0)
  rng = np.random.default_rng(1)
  if meta_sgd:
    for rate in learner.inner_lrs:
      rate.assign(alpha * (1 + 0.5 * rng.uniform(-1, 1, size=rate.shape)))
    rates = np.concatenate([learner.inner_lrs[0].numpy().reshape(-1),
                            learner.inner_lrs[1].numpy()])
  else:
    rates = np.full(DIM * NUM_WAYS + NUM_WAYS, alpha)
  episode = common.make_episode(num_tasks=2)
  sx, sy = episode.support_x.numpy(), episode.support_y.numpy()

  def meta_loss(theta, rates):
    adapted = sgd(np.stack([theta, theta]), rates, sx, sy, steps)
    return transcription.query_loss(adapted, episode)

  theta = flat_head(learner)
  adapted = learner.adapt(episode.support_x, episode.support_y, training=True, seed=SEED)
  np.testing.assert_allclose(
      np.concatenate([adapted[0].numpy().reshape(2, -1), adapted[1].numpy()], 1),
      sgd(np.stack([theta, theta]), rates, sx, sy, steps), rtol=1e-11, atol=1e-13)
  loss, grads, _ = learner.loss_and_gradients(episode, seed=SEED)
  np.testing.assert_allclose(float(loss), meta_loss(theta, rates), rtol=1e-12)
  by_var = {v.ref(): g.numpy() for v, g in zip(learner.trainable_variables, grads)}
  w, b = learner.head.params
  expected = transcription.central_difference(lambda t: meta_loss(t, rates), theta)
  got = np.concatenate([by_var[w.ref()].reshape(-1), by_var[b.ref()]])
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
  if meta_sgd:
    expected = transcription.central_difference(lambda r: meta_loss(theta, r), rates)
    got = np.concatenate([by_var[learner.inner_lrs[0].ref()].reshape(-1),
                          by_var[learner.inner_lrs[1].ref()]])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("train_on_query", [True, False])
def test_reptile_gradient_is_theta_minus_the_mean_adapted_head(train_on_query):
  steps, alpha = 3, 0.7
  learner = reptile.build(reptile.Config(hidden_sizes="", inner_steps=steps, inner_lr=alpha,
                                         train_on_query=train_on_query),
                          NUM_WAYS, DIM, "float64")
  set_head(learner, 2)
  episode = common.make_episode(num_tasks=3, num_shots=1, num_queries=2)
  x, y = episode.support_x.numpy(), episode.support_y.numpy()
  if train_on_query:   # U^k on the support and the query examples (K + V per class)
    x = np.concatenate([x, episode.query_x.numpy()], 2)
    y = np.concatenate([y, episode.query_y.numpy()], 2)
  theta = flat_head(learner)
  adapted = sgd(np.stack([theta] * 3), alpha, x, y, steps)
  loss, grads, metrics = learner.loss_and_gradients(episode, seed=SEED)
  by_var = {v.ref(): g.numpy() for v, g in zip(learner.trainable_variables, grads)}
  w, b = learner.head.params
  got = np.concatenate([by_var[w.ref()].reshape(-1), by_var[b.ref()]])
  np.testing.assert_allclose(got, theta - adapted.mean(0), rtol=1e-10, atol=1e-13)
  np.testing.assert_allclose(float(loss), transcription.query_loss(adapted, episode),
                             rtol=1e-11)
  support_losses, _ = mean_ce_and_gradient(adapted, x, y)
  np.testing.assert_allclose(float(metrics["support_loss"]), support_losses.mean(), rtol=1e-11)
  label = "support-fit accuracy" if train_on_query else "train_acc"
  assert learner.train_accuracy_label == label
