"""head_init='proto' (Proto-MAML, Triantafillou et al. 2020) for every head
learner: the closed form of the prototype layer, nearest-prototype scoring
before any inner step, and the meta-gradients that pass through the
prototypes (iMAML's anchor chain, Reptile's per-task start)."""

import numpy as np
import pytest
import tensorflow as tf

from leo_suite.models import heads
from leo_suite.models import registry
from tests.test_maml import DIM, NUM_WAYS, SEED, make_episode, perturb_variables

HEAD_LEARNERS = ("maml", "imaml", "reptile", "meta_lstm", "l2f")


def build(name, **overrides):
  config = registry.spec(name).config_class(head_init="proto", **overrides)
  return registry.build(name, config, NUM_WAYS, DIM, "float64")


def shuffled_episode(seed=0, num_shots=3):
  """An episode whose support examples are in random order (labels decide the
  classes, not positions)."""
  episode = make_episode(seed=seed, num_shots=num_shots)
  rng = np.random.default_rng(seed)
  num_tasks = episode.support_x.shape[0]
  x = tf.reshape(episode.support_x, [num_tasks, -1, DIM]).numpy()
  y = tf.reshape(episode.support_y, [num_tasks, -1]).numpy()
  order = np.stack([rng.permutation(x.shape[1]) for _ in range(num_tasks)])
  x = np.take_along_axis(x, order[..., None], axis=1)
  y = np.take_along_axis(y, order, axis=1)
  return episode._replace(support_x=tf.constant(x.reshape(episode.support_x.shape)),
                          support_y=tf.constant(y.reshape(episode.support_y.shape)))


def numpy_prototypes(features, labels):
  """[B, N, H] class means of features [B, M, H] by labels [B, M]."""
  return np.stack([[features[b][labels[b] == c].mean(axis=0) for c in range(NUM_WAYS)]
                   for b in range(features.shape[0])])


@pytest.mark.parametrize("hidden_sizes", [(), (7,)])
def test_prototype_layer_is_the_euclidean_nearest_prototype_classifier(hidden_sizes):
  """W_out = theta_W + 2 P^T, b_out = theta_b - ||p||^2 on the last hidden
  features; with theta_out = 0: logits = -||h - p_c||^2 + ||h||^2."""
  params = heads.HeadParams(NUM_WAYS, DIM, hidden_sizes, dtype=tf.float64,
                            output_init="proto")
  episode = shuffled_episode()
  theta = params.tiled(3)
  start = heads.add_prototype_layer(theta, episode.support_x, episode.support_y)
  for before, after in zip(theta[:-2], start[:-2]):  # hidden layers untouched
    np.testing.assert_array_equal(before.numpy(), after.numpy())
  features = heads.hidden_features(theta[:-2], episode.support_x).numpy()
  protos = numpy_prototypes(features, episode.support_y.numpy().reshape(3, -1))
  np.testing.assert_allclose(start[-2].numpy(), 2 * protos.transpose(0, 2, 1), rtol=1e-12)
  np.testing.assert_allclose(start[-1].numpy(), -np.sum(protos ** 2, -1), rtol=1e-12)
  query = heads.hidden_features(theta[:-2], episode.query_x).numpy()  # [B, M, H]
  logits = heads.head_logits(start, episode.query_x).numpy().reshape(3, -1, NUM_WAYS)
  distances = np.sum((query[:, :, None] - protos[:, None]) ** 2, -1)
  np.testing.assert_allclose(logits, -distances + np.sum(query ** 2, -1, keepdims=True),
                             rtol=1e-10, atol=1e-12)
  # A meta-learned residual theta_out adds to the prototypes.
  residual = [tf.zeros_like(t) for t in theta[:-2]] + [tf.ones_like(theta[-2]),
                                                       tf.ones_like(theta[-1])]
  moved = heads.add_prototype_layer([t + r for t, r in zip(theta, residual)],
                                    episode.support_x, episode.support_y)
  np.testing.assert_allclose((moved[-2] - start[-2]).numpy(), 1.0, rtol=1e-12)
  np.testing.assert_allclose((moved[-1] - start[-1]).numpy(), 1.0, rtol=1e-12)


ZERO_STEPS = {"maml": {"inner_steps": 0, "eval_inner_steps": 0},
              "imaml": {"inner_steps": 0},
              "reptile": {"inner_steps": 0, "eval_inner_steps": 0},
              "meta_lstm": {"inner_steps": 0}}


@pytest.mark.parametrize("name", sorted(ZERO_STEPS))
def test_before_any_inner_step_the_learner_is_nearest_prototype(name):
  learner = build(name, hidden_sizes="", **ZERO_STEPS[name])
  episode = shuffled_episode(seed=1)
  state = learner.adapt(episode.support_x, episode.support_y, training=False, seed=SEED)
  logits = learner.predict(state, episode.query_x, training=False, seed=SEED).numpy()
  x = episode.support_x.numpy().reshape(3, -1, DIM)
  protos = numpy_prototypes(x, episode.support_y.numpy().reshape(3, -1))
  query = episode.query_x.numpy()
  expected = 2 * np.einsum("bnvd,bcd->bnvc", query, protos) - np.sum(protos ** 2, -1)[
      :, None, None]
  np.testing.assert_allclose(logits, expected, rtol=1e-10, atol=1e-12)
  nearest = np.argmin(np.sum((query[..., None, :] - protos[:, None, None]) ** 2, -1), -1)
  np.testing.assert_array_equal(np.argmax(logits, -1), nearest)


@pytest.mark.parametrize("name", HEAD_LEARNERS)
def test_each_task_starts_from_its_own_prototypes(name):
  learner = build(name, hidden_sizes="8") if name != "l2f" else build(name)
  episode = make_episode(seed=2)
  start = learner.initial_fast_weights(episode.support_x, episode.support_y)
  other = learner.initial_fast_weights(episode.support_x[::-1], episode.support_y[::-1])
  np.testing.assert_allclose(start[-2].numpy()[::-1], other[-2].numpy(), rtol=1e-12)
  assert np.max(np.abs(start[-2].numpy()[0] - start[-2].numpy()[1])) > 1e-3
  _, grads, metrics = learner.loss_and_gradients(episode, seed=SEED)
  assert all(np.all(np.isfinite(g.numpy())) for g in grads)
  assert np.isfinite(metrics["query_loss"].numpy())


def test_imaml_meta_gradient_reaches_theta_through_the_prototypes():
  """With no inner steps phi* is the anchor theta + P(theta_hidden) and the
  first-order v is the query gradient there: the meta-gradient must then be
  the plain gradient of the mean query loss at the anchor, hidden layers included."""
  learner = build("imaml", hidden_sizes="8", inner_steps=0, cg_steps=0)
  perturb_variables(learner, seed=5)
  episode = make_episode(seed=3)
  _, grads, _ = learner.loss_and_gradients(episode, seed=SEED)
  with tf.GradientTape() as tape:
    start = learner.initial_fast_weights(episode.support_x, episode.support_y)
    loss = tf.reduce_mean(heads.head_task_losses(start, episode.query_x, episode.query_y))
  expected = tape.gradient(loss, learner.trainable_variables)
  assert np.max(np.abs(expected[0].numpy())) > 1e-4  # the first hidden layer gets a gradient
  for got, want in zip(grads, expected):
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-9, atol=1e-12)


def test_reptile_gradient_is_one_step_from_each_tasks_prototype_start():
  """One SGD step of size alpha: g = mean_b (start_b - W_b) = alpha mean_b grad L_b(start_b)."""
  alpha = 0.7
  learner = build("reptile", hidden_sizes="8", inner_steps=1, inner_lr=alpha,
                  inner_optimizer="sgd", inner_batch_size=0, train_on_query=False)
  perturb_variables(learner, seed=6)
  episode = make_episode(seed=4)
  _, grads, _ = learner.loss_and_gradients(episode, seed=SEED)
  start = learner.initial_fast_weights(episode.support_x, episode.support_y)
  step = heads.head_cross_entropy_gradients(start, episode.support_x, episode.support_y)
  by_param = {p.ref(): alpha * tf.reduce_mean(g, axis=0)
              for p, g in zip(learner.head.params, step)}
  for variable, got in zip(learner.trainable_variables, grads):
    np.testing.assert_allclose(got.numpy(), by_param[variable.ref()].numpy(), rtol=1e-9,
                               atol=1e-12)
