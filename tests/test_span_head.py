"""Evaluation's factored first layer (heads.SpanHead, adaptation.span_sgd_loop)
of Reptile and L2F: equal to the dense SGD inner loop run task by task
(float64), its logits and table readout equal the dense heads', and the
table-path accuracies equal a per-task dense reference on fixed tasks."""

import numpy as np
import pytest
import tensorflow as tf

from leo_suite.data import episodes
from leo_suite.models import adaptation
from leo_suite.models import base
from leo_suite.models import heads
from leo_suite.models import l2f
from leo_suite.models import registry
from leo_suite.models import reptile
from leo_suite.models import transforms
from leo_suite.training import evaluation
from tests import test_evaluation
from tests import test_maml as common

NUM_WAYS, DIM, SEED = common.NUM_WAYS, common.DIM, common.SEED


MODULES = {"reptile": reptile, "l2f": l2f}


def build64(model="reptile", **overrides):
  module = MODULES[model]
  return module.build(module.Config(**overrides), NUM_WAYS, DIM, "float64")




def dense_reference(learner, support_x, support_y, steps):
  """The dense SGD loop (adapt_loop, transforms.sgd), one task at a time."""
  per_task = []
  for b in range(support_x.shape[0]):
    x, y = support_x[b:b + 1], support_y[b:b + 1]
    gradient_fn = learner.support_gradient_fn(x, y)
    per_task.append(adaptation.adapt_loop(
        lambda params, step: gradient_fn(params), learner.initial_fast_weights(x, y),
        transforms.sgd(learner.config.inner_lr), steps, differentiable=False))
  return [tf.concat(parts, 0) for parts in zip(*per_task)]


@pytest.mark.parametrize("model, overrides", [
    ("reptile", dict(hidden_sizes="8")),
    ("reptile", dict(hidden_sizes="8,6", inner_lr=0.7)),
    ("reptile", dict(hidden_sizes="8", head_init="proto")),
    ("l2f", dict(hidden_sizes="8")),             # gamma o theta: a per-task scale of W_1
    ("l2f", dict(hidden_sizes="8,6", inner_lr=0.7, head_init="proto"))])
def test_span_loop_equals_the_dense_sgd_loop_task_by_task(model, overrides):
  learner = build64(model, eval_inner_steps=7, **overrides)
  common.perturb_variables(learner, seed=2)
  episode = common.make_episode(num_tasks=3, num_shots=2)
  state = learner.readout_state(episode.support_x, episode.support_y, seed=SEED)
  assert isinstance(state, heads.SpanHead)
  assert state.support.shape == (3, NUM_WAYS * 2, DIM)  # M = N K rows, not D x H_1
  expected = dense_reference(learner, episode.support_x, episode.support_y, 7)
  theta_w1 = learner.head.params[0]
  for want, got in zip(expected, state.dense(theta_w1)):
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-10, atol=1e-13)
  # The fast weights moved (the test is not comparing theta with theta).
  assert np.abs(expected[0].numpy() - theta_w1.numpy()).max() > 1e-3
  if model == "l2f":  # W_1 starts at gamma_1 theta_W1, not theta_W1
    gamma = learner.attenuation(episode.support_x, episode.support_y)[:, 0].numpy()
    np.testing.assert_allclose(state.scale.numpy(), gamma, rtol=1e-12)
    assert np.ptp(gamma) > 0
  # adapt's evaluation-mode fast weights are the same heads, dense.
  adapted = learner.adapt(episode.support_x, episode.support_y, training=False, seed=SEED)
  for want, got in zip(expected, adapted):
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-10, atol=1e-13)

  # Logits of query rows, and the readout's shared rows finished per task.
  dense_logits = heads.head_logits(expected, episode.query_x)
  np.testing.assert_allclose(
      learner.predict(state, episode.query_x, training=False, seed=SEED).numpy(),
      dense_logits.numpy(), rtol=1e-10, atol=1e-12)
  rows = tf.reshape(episode.query_x[0], [-1, DIM])  # task 0's rows, scored by every task
  readout = learner.readout(state)
  assert readout.weights is None and readout.finish
  finished = learner.finish_readout(readout.row_map(rows)[tf.newaxis], state)
  broadcast = tf.broadcast_to(rows, [3] + rows.shape.as_list())
  np.testing.assert_allclose(finished.numpy(), heads.head_logits(expected, broadcast).numpy(),
                             rtol=1e-10, atol=1e-12)


def test_adam_meta_sgd_and_linear_heads_keep_dense_fast_weights():
  episode = common.make_episode()
  for learner in (build64(hidden_sizes="8", inner_optimizer="adam", inner_lr=0.05),
                  build64(hidden_sizes=""), build64("l2f", hidden_sizes="8", meta_sgd=True),
                  build64("l2f", hidden_sizes="")):
    state = learner.readout_state(episode.support_x, episode.support_y, seed=SEED)
    assert isinstance(state, list) and len(state) == len(learner.head.params)


@pytest.mark.parametrize("model", sorted(MODULES))
def test_table_accuracies_equal_a_per_task_dense_reference(model):
  split = test_evaluation.clustered_split([9] * 8)
  spec = episodes.EpisodeSpec(4, 2, 7)
  sampler = episodes.EpisodeSampler(split, spec)
  tf.random.set_seed(3)
  learner = registry.build(model, MODULES[model].Config(hidden_sizes="32", eval_inner_steps=9),
                           spec.num_ways, test_evaluation.DIM)
  table = evaluation.Evaluator(learner).fixed_accuracy(sampler, 5, 21, 8, method="table")
  readout = learner.readout(learner.readout_state(*next(iter(sampler.fixed_set(5, 8, 8)))[:2],
                                                  seed=SEED))
  assert readout.width == spec.num_ways * spec.num_shots + 32  # M + H_1 floats per row, task
  reference = []
  for episode in sampler.fixed_set(5, 21, 8):
    fast_weights = dense_reference(learner, episode.support_x, episode.support_y, 9)
    logits = heads.head_logits(fast_weights, episode.query_x)
    reference.append(base.accuracy(logits, episode.query_y).numpy())
  reference = np.concatenate(reference)
  assert 0.0 < reference.mean() < 1.0 and np.ptp(reference) > 0
  np.testing.assert_array_equal(table, reference)
