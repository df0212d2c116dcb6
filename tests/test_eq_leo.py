"""LEO's meta-objective (Rusu et al. 2019, eq. 6-8), every term pinned to an
independent transcription of the release in the test (float64, recorded
random draws): the KL term (sign and scale), the encoder penalty and its
stop_gradient, the L2 and orthogonality penalties (on cosines, not the Gram
matrix), the two inner loops and the second-order meta-gradient."""

import math

import numpy as np
import pytest
import tensorflow as tf

from leo_suite.models import base
from leo_suite.models import leo
from tests import test_leo as common

N, K, D, LATENTS = 3, 2, 6, 4
SEED = tf.constant([5, 6], tf.int32)
# Distinct weights, every one large enough to move the loss and its gradient.
CONFIG = leo.Config(inner_unroll_length=2, finetuning_unroll_length=2, num_latents=LATENTS,
                    inner_lr_init=0.3, finetuning_lr_init=0.2, dropout_rate=0.0,
                    kl_weight=0.3, encoder_penalty_weight=0.7, l2_penalty_weight=0.01,
                    orthogonality_penalty_weight=0.05)


def make_model(config=CONFIG, seed=1):
  tf.random.set_seed(seed)
  return leo.LEO(config, N, D, "float64")


def episode(seed=0):
  return common.make_episode(num_tasks=2, num_ways=N, num_shots=K, num_queries=2, dim=D,
                             seed=seed)


def summed_ce(logits, labels):
  return tf.nn.softmax_cross_entropy_with_logits(
      labels=tf.one_hot(labels, N, dtype=logits.dtype), logits=logits)


def classifier_logits(x, weights):
  """logits[b, n, k, c] = <x[b, n, k], mean_k' w[b, c, k']> (written out)."""
  return tf.reduce_sum(x[:, :, :, tf.newaxis, :] *
                       tf.reduce_mean(weights, axis=2)[:, tf.newaxis, tf.newaxis], -1)


def reference_meta_loss(model, ep, draws, terms):
  """The release's meta-training loss written from the paper, with the latent
  and weight noise taken from `draws` (in the order LEO draws them: z_0's,
  then one per decode). `terms` collects each term for the caller."""
  config = model.config
  draws = list(draws)
  params = model.encode(ep.support_x, False, lambda: None)       # encoder: no dropout
  mean, raw = params[..., :LATENTS], params[..., LATENTS:]
  std = tf.maximum(tf.exp(raw) - 1.0, 1e-10)
  noise = draws.pop(0)
  z0 = mean + std * noise
  # log N(z0; mean, std), with (z0 - mean) / std = noise (std may be the 1e-10 floor)
  log_q = -0.5 * tf.square(noise) - tf.math.log(std) - 0.5 * math.log(2 * math.pi)
  log_p = -0.5 * tf.square(z0) - 0.5 * math.log(2 * math.pi)
  terms["kl"] = tf.reduce_mean(log_q - log_p)                   # per task, then over tasks

  offset = math.sqrt(2.0 / (D + N))

  def decode(z):
    out = tf.einsum("bnkl,ld->bnkd", z, model.decoder_w)
    w_mean, w_raw = out[..., :D], out[..., D:]
    return w_mean + tf.maximum(tf.exp(w_raw) - (1.0 - offset), 1e-10) * draws.pop(0)

  z = z0
  for _ in range(config.inner_unroll_length):
    with tf.GradientTape() as tape:
      tape.watch(z)
      loss = tf.reduce_sum(summed_ce(classifier_logits(ep.support_x, decode(z)),
                                     ep.support_y))
    z = z - model.inner_lr * tape.gradient(loss, z)
  terms["encoder_penalty"] = tf.reduce_mean(tf.square(z0 - tf.stop_gradient(z)))
  w = decode(z)
  for _ in range(config.finetuning_unroll_length):
    with tf.GradientTape() as tape:
      tape.watch(w)
      loss = tf.reduce_sum(summed_ce(classifier_logits(ep.support_x, w), ep.support_y))
    w = w - model.finetuning_lr * tape.gradient(loss, w)
  assert not draws
  terms["query_loss"] = tf.reduce_mean(summed_ce(classifier_logits(ep.query_x, w), ep.query_y))
  terms["l2"] = config.l2_penalty_weight / 2 * sum(
      tf.reduce_sum(tf.square(v)) for v in [model.encoder_w] + model.relation_ws +
      [model.decoder_w])
  rows = model.decoder_w
  cosines = tf.matmul(rows, rows, transpose_b=True) / (
      tf.norm(rows, axis=1)[:, None] * tf.norm(rows, axis=1)[None, :])
  terms["orthogonality"] = config.orthogonality_penalty_weight * tf.reduce_mean(
      tf.square(cosines - tf.eye(LATENTS, dtype=tf.float64)))
  return (terms["query_loss"] + config.kl_weight * terms["kl"] +
          config.encoder_penalty_weight * terms["encoder_penalty"] + terms["l2"] +
          terms["orthogonality"])


def model_and_reference(seed=0):
  model = make_model()
  ep = episode(seed)
  variables = model.trainable_variables
  with tf.GradientTape(persistent=True) as tape:
    with base.recording_draws() as recorded:
      loss, metrics = model.meta_loss(ep, training=True, seed=SEED)
    terms = {}
    expected = reference_meta_loss(model, ep, [tf.stop_gradient(d) for d in recorded["draws"]],
                                   terms)
  return (model, loss, metrics, expected, terms,
          tape.gradient(loss, variables), tape.gradient(expected, variables))


def test_meta_loss_and_every_gradient_equal_the_transcribed_release():
  model, loss, metrics, expected, terms, grads, expected_grads = model_and_reference()
  assert len(model.trainable_variables) == 7
  np.testing.assert_allclose(float(loss), float(expected), rtol=1e-9)
  for name in ("kl", "encoder_penalty", "query_loss"):
    np.testing.assert_allclose(float(metrics[name]), float(terms[name]), rtol=1e-9,
                               err_msg=name)
  for var, got, want in zip(model.trainable_variables, grads, expected_grads):
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-9, atol=1e-12,
                               err_msg=var.name)


def test_each_weighted_term_enters_with_its_own_sign_and_weight():
  """loss(beta, gamma) - loss(0, 0) = beta KL + gamma penalty, with KL and the
  penalty as reported (the same draws: the seed fixes them)."""
  ep = episode()
  def run(**weights):
    model = make_model(CONFIG.__class__(**{**CONFIG.__dict__, **weights}))
    return model.meta_loss(ep, training=True, seed=SEED)
  base_loss, _ = run(kl_weight=0.0, encoder_penalty_weight=0.0)
  kl_loss, metrics = run(kl_weight=0.3, encoder_penalty_weight=0.0)
  pen_loss, _ = run(kl_weight=0.0, encoder_penalty_weight=0.7)
  np.testing.assert_allclose(float(kl_loss - base_loss), 0.3 * float(metrics["kl"]), rtol=1e-10)
  np.testing.assert_allclose(float(pen_loss - base_loss),
                             0.7 * float(metrics["encoder_penalty"]), rtol=1e-10)
  assert float(metrics["encoder_penalty"]) > 1e-6


def test_encoder_penalty_has_no_gradient_through_the_adapted_latents():
  """gamma ||z_0 - stopgrad(z_T)||^2: z_0 depends on the encoder and the
  relation net only, z_T also on alpha, eta and the decoder, which therefore
  get no gradient from the penalty term (and the encoder gets one)."""
  ep = episode()
  def grads(weight):
    model = make_model(CONFIG.__class__(**{**CONFIG.__dict__, "encoder_penalty_weight": weight}))
    _, g, _ = model.loss_and_gradients(ep, seed=SEED)
    return model, g
  model, with_penalty = grads(0.7)
  _, without = grads(0.0)
  difference = {v.ref(): (a - b).numpy() for v, a, b in
                zip(model.trainable_variables, with_penalty, without)}
  for var in (model.inner_lr, model.finetuning_lr, model.decoder_w):
    assert np.abs(difference[var.ref()]).max() < 1e-15, var.name
  assert np.abs(difference[model.encoder_w.ref()]).max() > 1e-6


@pytest.mark.parametrize("scales", [[1.0, 1.0, 1.0, 1.0], [0.1, 3.0, 1.0, 7.0]])
def test_orthogonality_penalty_is_on_cosines_of_the_decoder_rows(scales):
  """Omega = lambda_2 mean((C - I)^2), C the cosines of the d_z rows of the
  decoder: invariant to each row's norm (the Gram matrix is not)."""
  model = make_model()
  rng = np.random.default_rng(0)
  rows = rng.standard_normal((LATENTS, 2 * D))
  model.decoder_w.assign(rows * np.asarray(scales)[:, None])
  unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
  expected = 0.05 * np.mean((unit @ unit.T - np.eye(LATENTS)) ** 2)
  np.testing.assert_allclose(float(model.orthogonality_penalty()), expected, rtol=1e-12)


def test_evaluation_loss_has_no_kl_and_no_encoder_penalty():
  model = make_model()
  ep = episode()
  loss, metrics = model.meta_loss(ep, training=False, seed=SEED)
  np.testing.assert_allclose(float(loss), float(metrics["query_loss"] + model.regularization()),
                             rtol=1e-12)
  assert float(metrics["kl"]) == 0.0 and float(metrics["encoder_penalty"]) == 0.0
