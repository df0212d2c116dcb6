"""Relation Network: the K-shot class feature is the SUM of the support
features, the relation module on explicit [class ; query] pairs in numpy, the
loss is the MSE to one-hot, finite differences, common checks, meta-training."""

import numpy as np
import pytest
import tensorflow as tf

from leo_suite import errors
from leo_suite.models import base
from leo_suite.models import relation
from tests import learner_checks
from tests import test_maml as common
from tests import test_protonet
from tests.test_protonet import DIM, NUM_WAYS, SEED, logits_of, permuted_episode



def build64(**overrides):
  return relation.build(relation.Config(**overrides), NUM_WAYS, DIM, "float64")


def mapped(learner, x):
  """f(x) in numpy, rescaled to norm sqrt(d) with normalize_features."""
  features = learner.embedding_map(tf.constant(np.asarray(x))).numpy()
  if learner.config.normalize_features:
    features *= np.sqrt(features.shape[-1]) / np.linalg.norm(features, axis=-1,
                                                             keepdims=True)
  return features


def numpy_relation_logits(learner, class_features, queries):
  """g([c_k ; f(x_q)]) by explicit concatenation: class_features [N, d],
  queries [Q, d] -> [Q, N]."""
  pairs = np.concatenate([np.broadcast_to(class_features[None], (len(queries),) + class_features.shape),
                          np.broadcast_to(queries[:, None], (len(queries),) + class_features.shape)],
                         axis=-1)
  module = learner.relation_module
  h = pairs
  for layer, (w, b) in enumerate(zip(module.weights, module.biases)):
    h = h @ w.numpy() + b.numpy()
    if layer < len(module.weights) - 1:
      h = np.maximum(h, 0.0)
  if learner.cosine_weight is None:
    return h[..., 0]
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  return h[..., 0] + learner.cosine_weight.numpy() * unit(queries) @ unit(class_features).T


# -- class features -----------------------------------------------------------------

@pytest.mark.parametrize("pooling, normalize", [("sum", True), ("mean", True),
                                                ("sum", False)])
def test_k_shot_class_feature_is_the_sum_of_the_support_features(pooling, normalize):
  learner = build64(class_pooling=pooling, map_dim=6, normalize_features=normalize)
  episode = permuted_episode(seed=1, num_shots=3)
  state = learner.adapt(episode.support_x, episode.support_y, training=False, seed=SEED)
  features = mapped(learner, episode.support_x)
  labels = episode.support_y.numpy()
  for b in range(3):
    for k in range(NUM_WAYS):
      members = features[b][labels[b] == k]
      expected = members.sum(0) if pooling == "sum" else members.mean(0)
      np.testing.assert_allclose(state[b, k].numpy(), expected, rtol=1e-13, atol=1e-14)


def test_identical_shots_give_k_times_the_feature():
  learner = build64()
  episode = permuted_episode(seed=2, num_shots=1)
  k = 4
  repeated = tf.tile(episode.support_x, [1, 1, k, 1])
  one = learner.adapt(episode.support_x, episode.support_y, training=False, seed=SEED)
  many = learner.adapt(repeated, tf.tile(episode.support_y, [1, 1, k]), training=False,
                       seed=SEED)
  np.testing.assert_allclose(many.numpy(), k * one.numpy(), rtol=1e-13)


# -- relation module and loss ---------------------------------------------------------

@pytest.mark.parametrize("overrides", [dict(), dict(start="random"),
                                       dict(module_init="reference", embedding_map="mlp",
                                            map_dim=5, module_hidden_sizes="7",
                                            normalize_features=False, start="random")])
def test_scores_are_the_relation_module_on_class_then_query_pairs(overrides):
  learner = build64(**overrides)
  common.perturb_variables(learner, seed=3)
  episode = permuted_episode(seed=4)
  logits = logits_of(learner, *episode[:3])
  assert logits.shape == (3, NUM_WAYS, 4, NUM_WAYS)
  state = learner.adapt(episode.support_x, episode.support_y, training=False, seed=SEED)
  for b in range(3):
    queries = mapped(learner, episode.query_x[b].numpy().reshape(-1, DIM))
    expected = numpy_relation_logits(learner, state[b].numpy(), queries)
    np.testing.assert_allclose(logits[b].reshape(-1, NUM_WAYS), expected, rtol=1e-12,
                               atol=1e-13)
  scores = tf.sigmoid(logits).numpy()
  assert np.all((scores > 0) & (scores < 1))
  # The order is [class ; query]: swapping the halves of g's first layer changes g.
  w = learner.relation_module.weights[0]
  half = w.shape[0] // 2
  w.assign(tf.concat([w[half:], w[:half]], 0))
  assert np.abs(logits_of(learner, *episode[:3]) - logits).max() > 1e-6


def test_meta_loss_is_the_mean_squared_error_to_one_hot():
  learner = build64()
  common.perturb_variables(learner, seed=5)
  episode = permuted_episode(seed=6)
  loss, metrics = learner.meta_loss(episode, training=True, seed=SEED)
  logits = logits_of(learner, *episode[:3])
  target = np.eye(NUM_WAYS)[episode.query_y.numpy()]
  expected = np.mean((1.0 / (1.0 + np.exp(-logits)) - target) ** 2)
  np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-13)
  np.testing.assert_allclose(metrics["query_loss"].numpy(), expected, rtol=1e-13)
  accuracy = np.mean(logits.argmax(-1) == episode.query_y.numpy())
  np.testing.assert_allclose(metrics["accuracy"].numpy(), accuracy)
  # Not cross-entropy: the CE of the same logits is a different number.
  ce = tf.reduce_mean(base.cross_entropy(tf.constant(logits), episode.query_y)).numpy()
  assert abs(ce - expected) > 0.1


def test_reference_initialisation_of_the_relation_module():
  tf.random.set_seed(1)
  learner = relation.build(relation.Config(module_hidden_sizes="256,8",
                                           module_init="reference", start="random"),
                           NUM_WAYS, 64)
  for w, b in zip(learner.relation_module.weights, learner.relation_module.biases):
    np.testing.assert_array_equal(b.numpy(), 1.0)
  first = learner.relation_module.weights[0].numpy()
  assert abs(first.std() - 0.01) < 0.001 and abs(first.mean()) < 0.001


def test_reference_init_makes_the_module_additive_so_every_query_gets_one_argmax():
  """Why the default is Glorot: with weights N(0, 0.01^2) and biases 1 every
  ReLU of g is active for every input, so g is affine in [c ; q] and
  g(c, q) = a.c + b.q + const; the class ranking is the same for every
  query, and accuracy is exactly 1/N."""
  tf.random.set_seed(3)
  learner = build64(module_init="reference", start="random")
  episode = common.make_episode(num_shots=2, num_queries=4)
  logits = logits_of(learner, *episode[:3])
  centred = logits - logits.mean(-1, keepdims=True)            # drop b.q + const
  np.testing.assert_allclose(centred, np.broadcast_to(centred[:, :1, :1], centred.shape),
                             atol=1e-14)
  _, metrics = learner.meta_loss(episode, training=False, seed=SEED)
  assert metrics["accuracy"].numpy() == pytest.approx(1.0 / NUM_WAYS)
  glorot = logits_of(build64(start="random"), *episode[:3])
  assert len(np.unique(glorot.argmax(-1))) > 1


def test_normalized_features_have_unit_rms():
  learner = build64(map_dim=6)
  features = learner.embed(permuted_episode(seed=8).support_x).numpy()
  np.testing.assert_allclose(np.sqrt((features ** 2).mean(-1)), 1.0, rtol=1e-13)


def test_class_permutation_is_equivariant_and_shot_order_irrelevant():
  learner = build64()
  episode = permuted_episode(seed=7)
  logits = logits_of(learner, *episode[:3])
  rng = np.random.default_rng(0)
  relabel, shots = rng.permutation(NUM_WAYS), rng.permutation(3)
  support_x = tf.gather(episode.support_x, shots, axis=2)
  support_y = tf.gather(tf.constant(relabel[episode.support_y.numpy()]), shots, axis=2)
  moved = logits_of(learner, support_x, support_y, episode.query_x)
  np.testing.assert_allclose(moved[..., relabel], logits, rtol=1e-12, atol=1e-13)


# -- gradients ----------------------------------------------------------------------

def test_gradients_match_finite_differences():
  learner = build64(embedding_map="mlp", map_dim=5, map_hidden_sizes="6",
                    module_hidden_sizes="7,3")
  common.perturb_variables(learner, seed=8)
  episode = permuted_episode(seed=9, num_tasks=2, num_shots=2, num_queries=2)
  test_protonet.check_gradients_match_finite_differences(learner, episode)


@pytest.mark.parametrize("start", relation.STARTS)
def test_outer_steps_lower_the_query_loss(start):
  """The Relation Network has no support loss to lower (adaptation is a sum);
  meta-training lowers its MSE on a fixed episode."""
  learner = build64(start=start)
  episode = common.make_episode(num_shots=2, num_queries=4)
  optimizer = tf.keras.optimizers.Adam(1e-2)
  before = learner.meta_loss(episode, training=True, seed=SEED)[0].numpy()
  for _ in range(20):
    _, grads, _ = learner.loss_and_gradients(episode, seed=SEED)
    optimizer.apply_gradients(zip(grads, learner.trainable_variables))
  after = learner.meta_loss(episode, training=True, seed=SEED)[0].numpy()
  assert after < 0.5 * before, (before, after)


# -- the common learner checks ----------------------------------------------------------

def test_evaluation_is_deterministic():
  common.check_evaluation_is_deterministic(build64())


def test_checkpoint_round_trip_restores_identical_predictions(tmp_path):
  common.check_checkpoint_round_trip(build64, tmp_path)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_runs_in_tf_function_with_finite_loss_and_gradients(jit_compile):
  learner = relation.build(relation.Config(map_dim=8, module_hidden_sizes="8,4",
                                           start="random"), NUM_WAYS, DIM, "float32")
  common.check_finite_loss_and_gradients_in_tf_function(learner, jit_compile)


def test_wrong_shape_raises():
  with pytest.raises(ValueError, match="built for 5-way tasks of dimension 16"):
    build64().adapt(tf.zeros([1, 3, 1, DIM], tf.float64), tf.zeros([1, 3, 1], tf.int32),
                    training=False, seed=SEED)


@pytest.mark.parametrize("overrides, message", [
    (dict(class_pooling="max"), "--relation_class_pooling='max'"),
    (dict(module_init="zeros"), "--relation_module_init='zeros'"),
    (dict(start="snail"), "--relation_start='snail'"),
    (dict(cosine_scale=0.0), "--relation_cosine_scale=0.0"),
    (dict(module_hidden_sizes="8,"), "--relation_module_hidden_sizes='8,'"),
    (dict(embedding_map="conv4"), "--relation_embedding_map='conv4'"),
])
def test_bad_config_is_a_user_error(overrides, message):
  with pytest.raises(errors.ConfigError, match=message):
    build64(**overrides)


def test_every_config_field_has_help():
  learner_checks.check_config_fields_have_help(relation.Config)


# -- meta-training through the real Trainer ------------------------------------------

def test_meta_trained_relation_network_learns_to_compare(tmp_path):
  """From the random start (--relation_start=random) the Relation Network
  learns its comparison g from scratch (chance at init), under an MSE objective. On this toy problem, isotropic clusters where
  NCM (99.2%) is near-optimal, a learned comparator does not reach NCM in a
  short run: measured 79% after 60 steps, 92% after 150, 95.3% after 300 and
  96.6% after 1000 (Adam 3e-3). Where the metric itself must be learned (the
  runner's synthetic data, NCM 49%) it beats NCM widely (72.5% after 300)."""
  tf.random.set_seed(0)
  learner = relation.build(relation.Config(start="random"), NUM_WAYS, DIM, "float32")
  accuracy, ncm, at_init = common.meta_train_and_score(learner, tmp_path, steps=300)
  assert ncm > 0.5
  assert at_init < 0.35
  assert accuracy > 0.9 and accuracy > ncm - 0.08, (accuracy, ncm, at_init)
