"""Invariances every learner's equations imply, checked on all twelve
(evaluation mode, float64, tiny shapes): a query's prediction depends on no
other query (none is transductive) and a task's on no other task; where the
paper's adaptation is a function of the support SET, permuting the shots of a
class changes nothing; where it treats the N output slots alike, relabelling
the classes permutes the logits' columns the same way."""

import numpy as np
import pytest
import tensorflow as tf

from leo_suite.models import registry
from tests import test_maml as common

NUM_WAYS, DIM, SEED = common.NUM_WAYS, common.DIM, common.SEED

# Tiny configurations (flags of each learner's Config).
CONFIGS = {
    "leo": dict(num_latents=4, inner_unroll_length=2, finetuning_unroll_length=2,
                inner_lr_init=0.2, finetuning_lr_init=0.1),
    "maml": dict(hidden_sizes="8", eval_inner_steps=3),
    "imaml": dict(hidden_sizes="8", inner_steps=4),
    "r2d2": dict(),   # M = N K = 15 < D + 1: the Woodbury (M x M) solve, as at D = 640
    "l2f": dict(hidden_sizes="8", head_init="zeros", eval_inner_steps=3),
    "protonet": dict(map_dim=6),
    "matching": dict(map_dim=6),
    "relation": dict(map_dim=6, module_hidden_sizes="8"),
    "reptile": dict(hidden_sizes="8", eval_inner_steps=3),
    "meta_lstm": dict(hidden_sizes="8", inner_steps=3),
    "hallucination": dict(noise_dim=4, hidden_sizes="8", num_hallucinated=3),
    "snail": dict(input_dim=4, key_sizes="4,4", value_sizes="3,3", tc_filters=2),
}
# Support order matters by design: SNAIL reads it as a sequence; hallucination
# seeds generated example j from real shot j mod K.
ORDER_DEPENDENT = {"snail", "hallucination"}
# Not slot-symmetric by design: SNAIL's output layer and label channels are
# per slot; hallucination's evaluation noise is drawn per slot.
SLOT_ASYMMETRIC = {"snail", "hallucination"}


def build(name):
  tf.random.set_seed(1)
  return registry.build(name, registry.spec(name).config_class(**CONFIGS[name]), NUM_WAYS, DIM,
                        "float64")


def logits(learner, support_x, support_y, query_x):
  state = learner.adapt(support_x, support_y, training=False, seed=SEED)
  return learner.predict(state, query_x, training=False, seed=SEED).numpy()


@pytest.fixture(scope="module")
def episode():
  return common.make_episode(num_tasks=2, num_shots=3, num_queries=2)


@pytest.fixture(scope="module", params=list(CONFIGS))
def learner_logits(request, episode):
  learner = build(request.param)
  return request.param, learner, logits(learner, *episode[:3])


def test_a_query_depends_on_no_other_query_and_a_task_on_no_other_task(learner_logits, episode):
  name, learner, before = learner_logits
  query_x = episode.query_x.numpy().copy()
  query_x[0, 1, 0] = common.unit_rows(np.random.default_rng(5), (DIM,))
  after = logits(learner, episode.support_x, episode.support_y, tf.constant(query_x))
  changed = np.zeros(before.shape[:3], bool)
  changed[0, 1, 0] = True
  np.testing.assert_allclose(after[~changed], before[~changed], rtol=1e-10, atol=1e-12,
                             err_msg=name)
  assert np.abs(after[changed] - before[changed]).max() > 1e-8, name
  support_x = episode.support_x.numpy().copy()
  support_x[1] = common.unit_rows(np.random.default_rng(6), support_x[1].shape)
  other_task = logits(learner, tf.constant(support_x), episode.support_y, episode.query_x)
  np.testing.assert_allclose(other_task[0], before[0], rtol=1e-10, atol=1e-12, err_msg=name)
  assert np.abs(other_task[1] - before[1]).max() > 1e-8, name


def test_permuting_the_shots_of_each_class_changes_nothing(learner_logits, episode):
  name, learner, before = learner_logits
  if name in ORDER_DEPENDENT:
    pytest.skip(f"{name} depends on the support order by design")
  order = [2, 0, 1]
  after = logits(learner, tf.gather(episode.support_x, order, axis=2),
                 tf.gather(episode.support_y, order, axis=2), episode.query_x)
  np.testing.assert_allclose(after, before, rtol=1e-9, atol=1e-11, err_msg=name)


def test_relabelling_the_classes_permutes_the_logits(learner_logits, episode):
  """Support slot n gets label pi(n): the logit of class pi(n) is the old
  logit of slot n (labels are how the learner names its output slots)."""
  name, learner, before = learner_logits
  if name in SLOT_ASYMMETRIC:
    pytest.skip(f"{name}'s output slots are not symmetric by design")
  pi = np.array([3, 0, 4, 1, 2])
  # Present the classes in the new slot order so every learner sees label c
  # in slot c (class-major supports, as the sampler gives them).
  inverse = np.argsort(pi)
  support_x = tf.gather(episode.support_x, inverse, axis=1)
  query_x = tf.gather(episode.query_x, inverse, axis=1)
  after = logits(learner, support_x, episode.support_y, query_x)
  expected = before[:, inverse][..., inverse]
  np.testing.assert_allclose(after, expected, rtol=1e-9, atol=1e-11, err_msg=name)
  assert np.abs(before - before[..., inverse]).max() > 1e-6, name   # not trivially symmetric
