"""LEO: the release's model tests, ported, plus checks of the vectorised port."""

import dataclasses
import math
import os
import tempfile

import numpy as np
import pytest
import tensorflow as tf

from leo_suite.data.episodes import Episode
from leo_suite.models import base
from leo_suite.models import leo
from leo_suite.models import transforms

N, K, V, D = 3, 2, 4, 16
SEED = tf.constant([3, 4], tf.int32)

# The release's test configuration (model_test.py), with num_latents 4.
TEST_CONFIG = leo.Config(inner_unroll_length=3, finetuning_unroll_length=4,
                         num_latents=4, inner_lr_init=0.1, finetuning_lr_init=0.2,
                         dropout_rate=0.3, kl_weight=0.01, encoder_penalty_weight=0.01,
                         l2_penalty_weight=0.01, orthogonality_penalty_weight=0.01)


def make_model(config=TEST_CONFIG, num_ways=N, dim=D, seed=0):
  tf.random.set_seed(seed)
  return leo.LEO(config, num_ways, dim, "float64")


def make_episode(num_tasks=2, num_ways=N, num_shots=K, num_queries=V, dim=D, seed=0):
  rng = np.random.default_rng(seed)

  def unit(shape):
    x = rng.standard_normal(shape)
    return tf.constant(x / np.linalg.norm(x, axis=-1, keepdims=True))

  labels = lambda m: tf.constant(np.tile(np.arange(num_ways)[:, None], [num_tasks, 1, m])
                                 .reshape(num_tasks, num_ways, m), tf.int32)
  return Episode(unit([num_tasks, num_ways, num_shots, dim]), labels(num_shots),
                 unit([num_tasks, num_ways, num_queries, dim]), labels(num_queries))


def test_inner_loop_arithmetic():
  # Release test: identity maps, loss x * z^2 with x = 4, lr 0.1, 3 steps.
  z = leo.gradient_descent(tf.constant(4.0, tf.float64), lambda z: 4.0 * z ** 2,
                           tf.constant(0.1, tf.float64), 3)
  assert float(z) == pytest.approx(0.032, abs=1e-12)
  # The same arithmetic for the fine-tuning loop's learned rate of shape [1, 1, D].
  w = leo.gradient_descent(tf.fill([1, 1, 2], tf.constant(4.0, tf.float64)),
                           lambda w: 4.0 * w ** 2, tf.fill([1, 1, 2], tf.constant(0.1, tf.float64)), 3)
  np.testing.assert_allclose(w.numpy(), 0.032, atol=1e-12)


def test_inner_gradient_is_of_the_summed_loss():
  # Two examples with losses a*z^2 and b*z^2: one step moves z by lr * (g1 + g2).
  a, b, lr, z0 = 1.5, 2.5, 0.01, 2.0
  z = leo.gradient_descent(tf.constant(z0, tf.float64),
                           lambda z: tf.stack([a * z ** 2, b * z ** 2]), lr, 1)
  assert float(z) == pytest.approx(z0 - lr * (2 * a * z0 + 2 * b * z0), abs=1e-12)


def test_second_order_gradient_flows_through_inner_loop():
  # z1 = z0 - lr * 2 c z0 = z0 (1 - 2 c lr): d z1 / d lr = -2 c z0.
  lr = tf.Variable(0.1, dtype=tf.float64)
  with tf.GradientTape() as tape:
    z1 = leo.gradient_descent(tf.constant(3.0, tf.float64), lambda z: 1.5 * z ** 2, lr, 1)
  assert float(tape.gradient(z1, lr)) == pytest.approx(-2 * 1.5 * 3.0)


def test_stddev_offsets():
  zero = tf.zeros([3], tf.float64)
  np.testing.assert_allclose(leo.stddev(zero, 0.0).numpy(), 1e-10)
  offset = math.sqrt(2.0 / (640 + 5))
  np.testing.assert_allclose(leo.stddev(zero, offset).numpy(), offset, rtol=1e-12)


def test_trainable_variables_match_the_release():
  model = make_model()
  shapes = sorted((v.name.split(":")[0], tuple(v.shape)) for v in model.trainable_variables)
  assert shapes == sorted([
      ("leo/encoder/w", (D, 4)), ("leo/relation_network/w_0", (8, 8)),
      ("leo/relation_network/w_1", (8, 8)), ("leo/relation_network/w_2", (8, 8)),
      ("leo/decoder/w", (4, 2 * D)), ("leo/leo_inner/lr", (1, 1, 4)),
      ("leo/finetuning/lr", (1, 1, D))])


def _naive_relation_codes(model, support_x):
  """The release's relation network: explicit concatenated pairs, per task."""
  out = []
  for task in support_x.numpy():
    codes = task.reshape(N * K, D) @ model.encoder_w.numpy()
    left = np.repeat(codes[:, None], N * K, axis=1)
    right = np.repeat(codes[None], N * K, axis=0)
    h = np.concatenate([left, right], -1)
    h = np.maximum(h @ model.relation_ws[0].numpy(), 0)
    h = np.maximum(h @ model.relation_ws[1].numpy(), 0)
    h = (h @ model.relation_ws[2].numpy()).mean(axis=1).reshape(N, K, -1)
    out.append(np.repeat(h.mean(axis=1, keepdims=True), K, axis=1))
  return np.stack(out)


def test_relation_network_matches_explicit_pairs():
  model = make_model()
  episode = make_episode()
  fast = model.encode(episode.support_x, False, base.SeedStream(SEED))
  np.testing.assert_allclose(fast.numpy(), _naive_relation_codes(model, episode.support_x),
                             rtol=1e-10, atol=1e-12)


def test_logits_average_inner_products_over_shots():
  model = make_model()
  episode = make_episode()
  weights = tf.random.normal([2, N, K, D], dtype=tf.float64)
  logits = model.logits(episode.query_x, weights, False, SEED).numpy()
  expected = np.einsum("bnvd,bckd->bnvck", episode.query_x.numpy(), weights.numpy()).mean(-1)
  np.testing.assert_allclose(logits, expected, rtol=1e-12)


def test_sampling_is_deterministic_at_eval_and_stochastic_in_training():
  model = make_model()
  episode = make_episode()
  eval_a = model.adapt(episode.support_x, episode.support_y, training=False, seed=SEED)
  eval_b = model.adapt(episode.support_x, episode.support_y, training=False,
                       seed=tf.constant([9, 9]))
  np.testing.assert_array_equal(eval_a.numpy(), eval_b.numpy())
  train_a = model.adapt(episode.support_x, episode.support_y, training=True, seed=SEED)
  train_b = model.adapt(episode.support_x, episode.support_y, training=True,
                        seed=tf.constant([9, 9]))
  assert np.abs(train_a.numpy() - train_b.numpy()).sum() > 1
  # Same seed, same draw: a step is a pure function of its seed.
  train_c = model.adapt(episode.support_x, episode.support_y, training=True, seed=SEED)
  np.testing.assert_array_equal(train_a.numpy(), train_c.numpy())


@pytest.mark.parametrize("num_shots", [1, 3])
def test_evaluation_adaptation_on_the_logits_equals_the_explicit_loops(num_shots):
  """adapt(training=False) runs both loops on the support logits; it must give
  the classifier of the release's explicit loops (decode every latent step,
  fine-tune the weights), with per-dimension learned rates."""
  model = make_model()
  rng = np.random.default_rng(1)
  model.inner_lr.assign(rng.uniform(0.5, 2.0, model.inner_lr.shape))
  model.finetuning_lr.assign(rng.uniform(0.1, 0.6, model.finetuning_lr.shape))
  for v in [model.encoder_w, model.decoder_w] + model.relation_ws:
    v.assign(v + 0.3 * rng.standard_normal(v.shape))
  episode = make_episode(num_tasks=3, num_shots=num_shots)
  explicit, _, _ = model._adapt(episode.support_x, episode.support_y, False,  # pylint: disable=protected-access
                                base.SeedStream(SEED))
  fast = model.adapt(episode.support_x, episode.support_y, training=False, seed=SEED)
  np.testing.assert_allclose(fast.numpy(), tf.reduce_mean(explicit, axis=2).numpy(),
                             rtol=1e-9, atol=1e-12)
  # The loops did something: the decoded start differs from the result.
  means, _ = tf.split(model.encode(episode.support_x, False, lambda: None), 2, axis=-1)
  start = model.decode(means, False, None)[:, :, 0]
  assert float(tf.reduce_max(tf.abs(fast - start))) > 1e-2


def test_kl_and_encoder_penalty_train_vs_eval():
  model = make_model()
  episode = make_episode()
  _, train_metrics = model.meta_loss(episode, training=True, seed=SEED)
  _, eval_metrics = model.meta_loss(episode, training=False, seed=SEED)
  assert abs(float(train_metrics["kl"])) > 0
  assert float(eval_metrics["kl"]) == 0
  assert float(train_metrics["encoder_penalty"]) > 1e-3
  assert float(eval_metrics["encoder_penalty"]) < 1e-7


def test_finetuning_lowers_the_support_loss():
  episode = make_episode()
  losses = {}
  for steps in (0, 4):
    model = make_model(dataclasses.replace(TEST_CONFIG, finetuning_unroll_length=steps))
    state = model.adapt(episode.support_x, episode.support_y, training=False, seed=SEED)
    logits = model.predict(state, episode.support_x, training=False, seed=SEED)
    losses[steps] = float(tf.reduce_mean(base.cross_entropy(logits, episode.support_y)))
  assert losses[4] < losses[0] - 1e-3


def test_tasks_are_independent_in_a_meta_batch():
  model = make_model()
  episode = make_episode(num_tasks=3)
  batched = model.adapt(episode.support_x, episode.support_y, training=False, seed=SEED).numpy()
  for b in range(3):
    single = model.adapt(episode.support_x[b:b + 1], episode.support_y[b:b + 1],
                         training=False, seed=SEED).numpy()
    np.testing.assert_allclose(batched[b:b + 1], single, rtol=1e-10, atol=1e-12)
  assert np.abs(batched[0] - batched[1]).max() > 1e-3  # different problems differ


def test_shape_change_raises():
  model = make_model()
  episode = make_episode()
  model.adapt(episode.support_x, episode.support_y, training=False, seed=SEED)
  other_k = make_episode(num_shots=K + 1)
  with pytest.raises(ValueError, match="K ="):
    model.adapt(other_k.support_x, other_k.support_y, training=False, seed=SEED)
  other_n = make_episode(num_ways=N + 1)
  with pytest.raises(ValueError, match="built for"):
    model.adapt(other_n.support_x, other_n.support_y, training=False, seed=SEED)
  other_d = make_episode(dim=D + 1)
  with pytest.raises(ValueError, match="built for"):
    model.adapt(other_d.support_x, other_d.support_y, training=False, seed=SEED)


def test_penalties_closed_forms():
  model = make_model()
  expected_l2 = 0.01 * sum(float(np.sum(w.numpy() ** 2)) for w in model.regularised_weights) / 2
  assert float(model.l2_penalty()) == pytest.approx(expected_l2, rel=1e-12)
  rows = np.linalg.qr(np.random.default_rng(0).standard_normal((2 * D, 4)))[0].T
  model.decoder_w.assign(rows)                      # orthonormal rows
  assert float(model.orthogonality_penalty()) < 1e-20
  model.decoder_w.assign(np.stack([rows[0]] * 4))  # duplicated rows: C = all ones
  assert float(model.orthogonality_penalty()) == pytest.approx(0.01 * 12 / 16, rel=1e-9)


def test_loss_gradients_cover_every_variable_and_no_input():
  model = make_model()
  episode = make_episode()
  loss, grads, _ = model.loss_and_gradients(episode, seed=SEED)
  assert np.isfinite(float(loss))
  for var, grad in zip(model.trainable_variables, grads):
    assert np.all(np.isfinite(grad.numpy())), var.name
    assert np.abs(grad.numpy()).sum() > 0, var.name
  with tf.GradientTape() as tape:
    loss, _ = model.meta_loss(episode, training=True, seed=SEED)
  assert tape.gradient(loss, episode.support_x) is None  # inputs are data, not parameters


def test_compiled_step_matches_eager_and_checkpoint_round_trip():
  model = make_model()
  episode = make_episode()
  eager = model.meta_loss(episode, training=True, seed=SEED)[0]
  compiled = tf.function(lambda e, s: model.meta_loss(e, training=True, seed=s)[0])(episode, SEED)
  assert float(eager) == pytest.approx(float(compiled), rel=1e-10)
  state = model.adapt(episode.support_x, episode.support_y, training=False, seed=SEED)
  before = model.predict(state, episode.query_x, training=False, seed=SEED).numpy()
  with tempfile.TemporaryDirectory() as tmp:
    path = tf.train.Checkpoint(learner=model).write(os.path.join(tmp, "ckpt"))
    other = make_model(seed=123)
    tf.train.Checkpoint(learner=other).read(path).assert_consumed()
  state = other.adapt(episode.support_x, episode.support_y, training=False, seed=SEED)
  np.testing.assert_array_equal(
      other.predict(state, episode.query_x, training=False, seed=SEED).numpy(), before)


def test_meta_training_lowers_the_query_loss():
  """A few outer steps on a fixed batch lower its (eval-mode) query loss."""
  from leo_suite.training import optim
  model = make_model(dataclasses.replace(TEST_CONFIG, dropout_rate=0.0))
  episode = make_episode(num_tasks=4)
  adam = optim.OptimizerState(transforms.adam(1e-2), model.trainable_variables)
  before = float(model.meta_loss(episode, training=False, seed=SEED)[1]["query_loss"])
  for step in range(30):
    loss, grads, _ = model.loss_and_gradients(episode, seed=tf.constant([0, step]))
    adam.apply(loss, grads, model.trainable_variables)
  after = float(model.meta_loss(episode, training=False, seed=SEED)[1]["query_loss"])
  assert after < before - 0.05
