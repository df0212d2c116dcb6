"""Matching Networks: the attention of Eq. 1-2 by hand in numpy, the Full
Context Embeddings by hand, FCE's order dependence (and its one exact
symmetry), invariants, finite differences, common checks and meta-training."""

import numpy as np
import pytest
import tensorflow as tf

from leo_suite import errors
from leo_suite.models import matching
from leo_suite.models import protonet
from tests import learner_checks
from tests import test_maml as common
from tests import test_protonet
from tests.test_protonet import DIM, NUM_WAYS, SEED, logits_of, permuted_episode



def build64(**overrides):
  return matching.build(matching.Config(**overrides), NUM_WAYS, DIM, "float64")


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def numpy_cell(cell, inputs, recurrent, state):
  """One step of matching.LSTMCell, written out."""
  gates = np.concatenate([inputs, recurrent], -1) @ cell.kernel.numpy() + cell.bias.numpy()
  i, f, g, o = np.split(gates, 4, axis=-1)
  state = sigmoid(f) * state + sigmoid(i) * np.tanh(g)
  return sigmoid(o) * np.tanh(state), state


def numpy_unroll(cell, sequence):
  """Hidden states of one task's sequence [M, d], zero initial states."""
  hidden, state, outputs = np.zeros(sequence.shape[-1]), np.zeros(sequence.shape[-1]), []
  for x in sequence:
    hidden, state = numpy_cell(cell, x, hidden, state)
    outputs.append(hidden)
  return np.stack(outputs)


def numpy_fce(learner, support, queries):
  """The paper's g and f (Appendix A) for one task: support [M, d], queries [Q, d]."""
  fce = learner.fce
  g = (numpy_unroll(fce.forward_lstm, support)
       + numpy_unroll(fce.backward_lstm, support[::-1])[::-1] + support)
  h, c = queries, np.zeros_like(queries)
  for _ in range(fce.steps):
    r = softmax(h @ g.T) @ g                        # r_{k-1} from h_{k-1}
    h_hat, c = numpy_cell(fce.attention_lstm, queries, np.concatenate([h, r], -1), c)
    h = h_hat + queries
  return g, h


def numpy_matching_logits(learner, episode):
  """log y^, y^ = sum_i softmax_i(s sim(f(x^), g(x_i))) y_i, task by task."""
  out = []
  for b in range(episode.support_x.shape[0]):
    mapped = lambda x: learner.embedding_map(tf.constant(x)).numpy()
    support = mapped(episode.support_x[b].numpy().reshape(-1, DIM))
    queries = mapped(episode.query_x[b].numpy().reshape(-1, DIM))
    if learner.fce is not None:
      support, queries = numpy_fce(learner, support, queries)
    if learner.config.metric == "cosine":
      similarity = unit(queries) @ unit(support).T
    else:
      similarity = -((queries[:, None] - support[None]) ** 2).sum(-1)
    attention = softmax(learner.metric.scale.numpy() * similarity)   # [Q, M]
    labels = np.eye(NUM_WAYS)[episode.support_y[b].numpy().reshape(-1)]
    y_hat = attention @ labels                                     # [Q, N]
    np.testing.assert_allclose(attention.sum(-1), 1.0, rtol=1e-14)
    np.testing.assert_allclose(y_hat.sum(-1), 1.0, rtol=1e-14)
    out.append(np.log(y_hat).reshape(episode.query_x.shape[1:3] + (NUM_WAYS,)))
  return np.stack(out)


# -- Eq. 1-2 by hand ----------------------------------------------------------------

@pytest.mark.parametrize("overrides", [
    dict(), dict(embedding_map="identity"), dict(learn_logit_scale=True, logit_scale=4.0),
    dict(metric="squared_euclidean", embedding_map="mlp", map_dim=6)])
def test_without_fce_equals_softmax_of_cosines_attention_by_hand(overrides):
  learner = build64(**overrides)
  common.perturb_variables(learner, seed=1)
  episode = permuted_episode(seed=2)
  logits = logits_of(learner, *episode[:3])
  np.testing.assert_allclose(logits, numpy_matching_logits(learner, episode),
                             rtol=1e-11, atol=1e-12)
  np.testing.assert_allclose(np.exp(logits).sum(-1), 1.0, rtol=1e-12)  # log y^


def test_one_shot_squared_euclidean_matching_network_is_protonet():
  """Snell et al. Sec. 2.5: with one shot the attention softmax(-d) over the
  support points is ProtoNet's softmax over the prototypes."""
  episode = permuted_episode(seed=3, num_shots=1)
  mn = build64(embedding_map="identity", metric="squared_euclidean")
  pn = test_protonet.build64(embedding_map="identity")
  np.testing.assert_allclose(logits_of(mn, *episode[:3]),
                             test_protonet.log_softmax(logits_of(pn, *episode[:3])),
                             rtol=1e-12, atol=1e-12)


def test_without_fce_support_order_is_irrelevant_and_classes_are_equivariant():
  learner = build64()
  episode = permuted_episode(seed=4)
  logits = logits_of(learner, *episode[:3])
  rng = np.random.default_rng(1)
  order = rng.permutation(NUM_WAYS * 3)                 # any reordering of the support
  relabel = rng.permutation(NUM_WAYS)
  flat = lambda t: tf.reshape(t, [3, NUM_WAYS * 3] + t.shape[3:].as_list())
  support_x = tf.reshape(tf.gather(flat(episode.support_x), order, axis=1),
                         episode.support_x.shape)
  support_y = tf.reshape(tf.gather(flat(tf.constant(relabel[episode.support_y.numpy()])),
                                   order, axis=1), episode.support_y.shape)
  moved = logits_of(learner, support_x, support_y, episode.query_x)
  np.testing.assert_allclose(moved[..., relabel], logits, rtol=1e-12, atol=1e-13)


def test_adapted_state_fits_its_own_support():
  for overrides in (dict(), dict(fce=True)):
    fitted, shuffled = test_protonet.support_self_loss(
        build64(**overrides), common.make_episode(num_shots=2))
    assert np.all(fitted < np.log(NUM_WAYS)), fitted
    assert np.all(fitted < shuffled - 1e-3), (fitted, shuffled)


# -- Full Context Embeddings --------------------------------------------------------

@pytest.mark.parametrize("steps", [0, 1, 3])
def test_fce_equals_the_papers_equations_by_hand(steps):
  learner = build64(fce=True, fce_steps=steps, map_dim=6)
  common.perturb_variables(learner, seed=5)
  episode = permuted_episode(seed=6, num_shots=2, num_queries=3)
  np.testing.assert_allclose(logits_of(learner, *episode[:3]),
                             numpy_matching_logits(learner, episode),
                             rtol=1e-10, atol=1e-11)


def test_fce_with_zero_lstm_weights_is_the_plain_network():
  """All gates 1/2, candidate 0: c = h = 0 throughout, so g = g', f = f'."""
  fce = build64(fce=True, fce_steps=4)
  for v in fce.fce.trainable_variables:
    v.assign(tf.zeros_like(v))
  plain = build64()
  plain.embedding_map.mlp.weights[0].assign(fce.embedding_map.mlp.weights[0])
  episode = permuted_episode(seed=7)
  np.testing.assert_array_equal(logits_of(fce, *episode[:3]),
                                logits_of(plain, *episode[:3]))


def reorder_support(episode, order):
  """The same support set (with labels) in another flattened sequence order."""
  shape = episode.support_x.shape
  flat_x = tf.reshape(episode.support_x, [shape[0], -1, shape[3]])
  flat_y = tf.reshape(episode.support_y, [shape[0], -1])
  return (tf.reshape(tf.gather(flat_x, order, axis=1), shape),
          tf.reshape(tf.gather(flat_y, order, axis=1), shape[:3]))


def test_fce_depends_on_support_order_except_reversal_with_tied_directions():
  """Documented behaviour: the BiLSTM reads the support as a sequence, so
  FCE's predictions change when the same support set is given in another
  order. Reversing the sequence swaps the forward and backward LSTMs' roles,
  so with equal weights in both directions it is an exact symmetry."""
  learner = build64(fce=True, map_dim=8)
  common.perturb_variables(learner, seed=8)
  episode = permuted_episode(seed=9, num_shots=2)
  size = NUM_WAYS * 2
  logits = logits_of(learner, *episode[:3])
  shuffled = logits_of(learner, *reorder_support(episode, np.random.default_rng(2).permutation(size)),
                       episode.query_x)
  reversed_ = logits_of(learner, *reorder_support(episode, np.arange(size)[::-1]),
                        episode.query_x)
  assert np.abs(shuffled - logits).max() > 1e-3
  assert np.abs(reversed_ - logits).max() > 1e-3
  for name in ("kernel", "bias"):
    getattr(learner.fce.backward_lstm, name).assign(getattr(learner.fce.forward_lstm, name))
  tied = logits_of(learner, *episode[:3])
  tied_reversed = logits_of(learner, *reorder_support(episode, np.arange(size)[::-1]),
                            episode.query_x)
  np.testing.assert_allclose(tied_reversed, tied, rtol=1e-12, atol=1e-13)
  tied_shuffled = logits_of(learner, *reorder_support(
      episode, np.random.default_rng(2).permutation(size)), episode.query_x)
  assert np.abs(tied_shuffled - tied).max() > 1e-3


def test_every_query_is_embedded_independently():
  """No transduction, with or without FCE: a query's logits do not depend on
  the other queries (the exporter predicts arbitrary query batches)."""
  for overrides in (dict(), dict(fce=True)):
    learner = build64(**overrides)
    episode = permuted_episode(seed=10, num_queries=4)
    all_queries = logits_of(learner, *episode[:3])
    one = logits_of(learner, episode.support_x, episode.support_y,
                    episode.query_x[:, 2:3, 1:2])
    np.testing.assert_allclose(one[:, 0, 0], all_queries[:, 2, 1], rtol=1e-12)


# -- gradients ----------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [dict(), dict(fce=True, fce_steps=2, map_dim=5,
                                                    learn_logit_scale=True)])
def test_gradients_match_finite_differences(overrides):
  learner = build64(**overrides)
  common.perturb_variables(learner, seed=11)
  episode = permuted_episode(seed=12, num_tasks=2, num_shots=2, num_queries=2)
  test_protonet.check_gradients_match_finite_differences(learner, episode)


# -- the common learner checks --------------------------------------------------------

def test_evaluation_is_deterministic():
  common.check_evaluation_is_deterministic(build64(fce=True))


def test_checkpoint_round_trip_restores_identical_predictions(tmp_path):
  common.check_checkpoint_round_trip(lambda: build64(fce=True, learn_logit_scale=True),
                                     tmp_path)


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("fce", [False, True])
def test_runs_in_tf_function_with_finite_loss_and_gradients(jit_compile, fce):
  learner = matching.build(matching.Config(fce=fce, map_dim=8), NUM_WAYS, DIM, "float32")
  common.check_finite_loss_and_gradients_in_tf_function(learner, jit_compile)


def test_wrong_shape_raises():
  with pytest.raises(ValueError, match="built for 5-way tasks of dimension 16"):
    build64().adapt(tf.zeros([1, 5, 1, DIM + 1], tf.float64), tf.zeros([1, 5, 1], tf.int32),
                    training=False, seed=SEED)


@pytest.mark.parametrize("overrides, message", [
    (dict(fce_steps=-1), "--matching_fce_steps=-1"),
    (dict(metric="dot"), "--matching_metric='dot'"),
    (dict(embedding_map="mlp", map_hidden_sizes="0"), "--matching_map_hidden_sizes='0'"),
    (dict(logit_scale=-2.0), "--matching_logit_scale=-2.0"),
])
def test_bad_config_is_a_user_error(overrides, message):
  with pytest.raises(errors.ConfigError, match=message):
    build64(**overrides)


def test_every_config_field_has_help_and_the_papers_defaults():
  learner_checks.check_config_fields_have_help(matching.Config)
  config = matching.Config()
  assert (config.metric, config.logit_scale, config.learn_logit_scale) == ("cosine", 1.0, False)
  assert protonet.Config().metric == "squared_euclidean"


# -- meta-training through the real Trainer ------------------------------------------

@pytest.mark.parametrize("fce", [False, True])
def test_meta_trained_matching_network_reaches_the_class_mean_baseline(tmp_path, fce):
  """At outer rate 1e-3 (the demo preset's): 99.0% without FCE, 99.0% with
  (NCM 99.2%); at 3e-3 FCE drifts to 95.7% after 60 steps (measured)."""
  tf.random.set_seed(0)
  learner = matching.build(matching.Config(fce=fce), NUM_WAYS, DIM, "float32")
  accuracy, ncm, _ = common.meta_train_and_score(learner, tmp_path, outer_lr=1e-3)
  assert ncm > 0.5
  assert accuracy >= ncm - 0.02, (accuracy, ncm)


def test_log_attention_stays_finite_when_a_class_is_far_behind():
  """Attention logits 2,000 apart: exp(z - row max) underflows to 0 for every
  class but the nearest one, and the call takes the per-class-maximum form:
  log y^_k = LSE over the class's points - LSE over all, exact."""
  learner = build64(embedding_map="identity")
  one_hot = tf.constant(np.eye(3)[[0, 1, 1, 2]][np.newaxis], tf.float64)   # [1, M=4, N=3]
  z = np.array([[[0.0, -2000.0, -2001.0, -3.0]]])                           # [1, Q=1, M]
  log_y = learner.finish_readout(tf.constant(z), (None, one_hot)).numpy()
  lse = lambda v: v.max() + np.log(np.exp(v - v.max()).sum())
  expected = [lse(z[0, 0, [0]]), lse(z[0, 0, [1, 2]]), lse(z[0, 0, [3]])] - lse(z[0, 0])
  np.testing.assert_allclose(log_y[0, 0], expected, rtol=1e-14)
  assert np.all(np.isfinite(log_y)) and log_y[0, 0, 1] < -1999


def test_row_maximum_and_class_maximum_forms_agree_on_ordinary_logits():
  rng = np.random.default_rng(4)
  one_hot = tf.constant(np.eye(5)[rng.permutation(np.repeat(np.arange(5), 3))][np.newaxis]
                        .repeat(2, 0), tf.float64)                      # [2, M=15, N=5]
  z = tf.constant(rng.normal(0.0, 8.0, [2, 7, 15]))
  fast = build64().finish_readout(z, (None, one_hot)).numpy()
  np.testing.assert_allclose(fast, matching._class_log_attention(z, one_hot).numpy(),
                             rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(np.exp(fast).sum(-1), 1.0, rtol=1e-12)
