"""SNAIL: the blocks against a numpy transcription of the paper, the cached
query step against full [support..., query] sequences, query independence and
causality (exact), support-order dependence, and the checks every learner
must pass (shared with tests/test_maml.py)."""

import math

import numpy as np
import pytest
import tensorflow as tf

from leo_suite import errors
from leo_suite.models import registry
from leo_suite.models import snail
from leo_suite.models import snail_blocks
from tests import learner_checks
from tests import test_maml as common

NUM_WAYS, DIM, SEED = common.NUM_WAYS, common.DIM, common.SEED
# The random start: tests/test_baseline_starts.py checks --snail_start=nearest_mean.
SMALL = dict(input_dim=8, key_sizes="8,6,4", value_sizes="4,3,5", tc_filters=6,
             sequence_length=11, start="random")


def build64(**overrides):
  return snail.build(snail.Config(**dict(SMALL, **overrides)), NUM_WAYS, DIM, "float64")


def logits_of(learner, episode):
  state = learner.adapt(episode.support_x, episode.support_y, training=False, seed=SEED)
  return learner.predict(state, episode.query_x, training=False, seed=SEED).numpy()


# -- the paper's blocks, transcribed in numpy ----------------------------------------

def numpy_network(learner, sequences):
  """Logits [S, T, N] of every step, block by block as in the paper (App. B)."""
  x = np.asarray(sequences, np.float64)
  length = x.shape[1]
  for block in learner.blocks:
    if isinstance(block, snail_blocks.DenseBlock):
      w, b, d = block.kernel.numpy(), block.bias.numpy(), block.dilation
      past = np.concatenate([np.zeros_like(x[:, :d]), x], axis=1)[:, :length]
      pre = past @ w[0] + x @ w[1] + b
      f, g = np.split(pre, 2, axis=-1)
      x = np.concatenate([x, np.tanh(f) / (1 + np.exp(-g))], axis=-1)
    else:
      k, _, v = block.sizes
      bias = block.bias.numpy()     # keys have none: [b_q, 0, b_v]
      proj = x @ block.kernel.numpy() + np.concatenate([bias[:k], np.zeros(k), bias[k:]])
      q, keys, values = proj[..., :k], proj[..., k:2 * k], proj[..., 2 * k:]
      reads = np.zeros(x.shape[:2] + (v,))
      for t in range(length):  # step t attends to steps 0..t, softmax over keys
        scores = np.einsum("sk,suk->su", q[:, t], keys[:, :t + 1]) / math.sqrt(k)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        reads[:, t] = np.einsum("su,suv->sv", weights, values[:, :t + 1])
      x = np.concatenate([x, reads], axis=-1)
  return x @ learner.output_weights.numpy() + learner.output_bias.numpy()


def test_network_matches_numpy_transcription_of_the_paper():
  learner = build64()
  common.perturb_variables(learner, seed=0)   # non-zero biases
  rng = np.random.default_rng(0)
  sequences = tf.constant(rng.normal(size=(4, 11, learner.step_width)))
  np.testing.assert_allclose(learner.sequence_logits(sequences).numpy(),
                             numpy_network(learner, sequences), rtol=1e-10, atol=1e-12)


def test_first_step_attends_only_to_itself():
  block = snail_blocks.AttentionBlock(3, 4, 2, tf.float64)
  x = tf.constant(np.random.default_rng(1).normal(size=(2, 5, 3)))
  out, (_, values) = block.sequence(x)
  np.testing.assert_allclose(out[:, 0, 3:].numpy(), values[:, 0].numpy(), rtol=1e-14)


def test_dilations_receptive_field_and_channel_count():
  assert snail_blocks.dilations(6) == [2, 4, 8]        # 5-way 1-shot
  assert snail_blocks.dilations(26) == [2, 4, 8, 16, 32]  # 5-way 5-shot
  assert snail_blocks.dilations(2) == [2]
  for length in range(2, 70):
    layers = len(snail_blocks.dilations(length))
    assert 2 ** (layers + 1) - 1 >= length   # receptive field covers T
  # d_in + N + sum(v) + (number of TC blocks) * F * ceil(log2 T)
  assert build64().channels == 8 + NUM_WAYS + (4 + 3 + 5) + 2 * 6 * 4
  paper = dict(input_dim=64, key_sizes="64,256,512", value_sizes="32,128,256",
               tc_filters=128)
  channels = lambda **config: snail.build(snail.Config(start="random", **config), NUM_WAYS,
                                          640).channels
  assert channels(**paper) == 64 + 5 + 32 + 128 + 256 + 2 * 128 * 3 == 1253
  assert channels(sequence_length=26, **paper) == 1765
  assert channels() == 640 + 5 + 16 + 32 + 64 + 2 * 32 * 3 == 949


# -- the cached query step is the full sequence's last step --------------------------

@pytest.mark.parametrize("num_shots, input_dim", [(1, 8), (2, 8), (3, 0)])
def test_prediction_equals_last_step_of_each_querys_own_sequence(num_shots, input_dim):
  learner = build64(input_dim=input_dim)
  episode = common.make_episode(num_tasks=3, num_shots=num_shots, num_queries=4)
  sequences = learner.query_sequences(episode.support_x, episode.support_y,
                                      episode.query_x)
  assert sequences.shape == (3 * NUM_WAYS * 4, NUM_WAYS * num_shots + 1,
                             learner.step_width)
  # The query's label slot is zero; the support's carries the one-hot label.
  np.testing.assert_array_equal(sequences[:, -1, -NUM_WAYS:].numpy(), 0.0)
  np.testing.assert_array_equal(
      sequences[0, :-1, -NUM_WAYS:].numpy(),
      np.eye(NUM_WAYS)[episode.support_y[0].numpy().reshape(-1)])
  full = learner.sequence_logits(sequences)[:, -1].numpy()
  np.testing.assert_allclose(logits_of(learner, episode).reshape(full.shape), full,
                             rtol=1e-10, atol=1e-13)


def test_a_query_never_changes_another_querys_prediction():
  learner = build64()
  episode = common.make_episode(num_tasks=2, num_queries=3)
  before = logits_of(learner, episode)
  query_x = episode.query_x.numpy().copy()
  query_x[1, 2, 0] = -query_x[1, 2, 0] + 0.5
  after = logits_of(learner, episode._replace(query_x=tf.constant(query_x)))
  changed = np.zeros(before.shape[:3], bool)
  changed[1, 2, 0] = True
  np.testing.assert_array_equal(after[~changed], before[~changed])   # exactly
  assert np.abs(after[changed] - before[changed]).max() > 1e-6


def test_causality_a_later_step_never_changes_an_earlier_output():
  learner = build64()
  rng = np.random.default_rng(2)
  sequences = rng.normal(size=(3, 11, learner.step_width))
  before = learner.sequence_logits(tf.constant(sequences)).numpy()
  for step in range(11):
    changed = sequences.copy()
    changed[:, step] = rng.normal(size=changed[:, step].shape)
    after = learner.sequence_logits(tf.constant(changed)).numpy()
    np.testing.assert_array_equal(after[:, :step], before[:, :step])   # exactly
    assert np.abs(after[:, step] - before[:, step]).max() > 1e-6


def test_predictions_depend_on_the_support_order():
  """Documented: a causal model reads the support in sequence, so the same
  labelled support in another order gives other logits."""
  learner = build64()
  episode = common.make_episode(num_shots=2)
  reordered = episode._replace(support_x=episode.support_x[:, ::-1],
                               support_y=episode.support_y[:, ::-1])
  assert np.abs(logits_of(learner, reordered) - logits_of(learner, episode)).max() > 1e-6


def test_support_labels_are_read():
  learner = build64()
  episode = common.make_episode(num_shots=1)
  relabelled = episode._replace(support_y=tf.roll(episode.support_y, 1, axis=1))
  assert np.abs(logits_of(learner, relabelled) - logits_of(learner, episode)).max() > 1e-6


# -- the checks every learner must pass -------------------------------------------

def test_evaluation_is_deterministic():
  common.check_evaluation_is_deterministic(build64())


def test_checkpoint_round_trip_restores_identical_predictions(tmp_path):
  common.check_checkpoint_round_trip(build64, tmp_path)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_runs_in_tf_function_with_finite_loss_and_gradients(jit_compile):
  learner = snail.build(snail.Config(**SMALL), NUM_WAYS, DIM, "float32")
  common.check_finite_loss_and_gradients_in_tf_function(learner, jit_compile)


def test_serving_style_signature_with_unknown_task_count():
  learner = build64()
  episode = common.make_episode(num_tasks=2, num_shots=1)
  adapt = tf.function(
      lambda x, y: learner.adapt(x, y, training=False, seed=SEED),
      input_signature=[tf.TensorSpec([None, NUM_WAYS, 1, DIM], tf.float64),
                       tf.TensorSpec([None, NUM_WAYS, 1], tf.int32)])
  predict = tf.function(lambda s, q: learner.predict(s, q, training=False, seed=SEED))
  logits = predict(adapt(episode.support_x, episode.support_y), episode.query_x)
  np.testing.assert_allclose(logits.numpy(), logits_of(learner, episode), rtol=1e-12)


def test_wrong_shape_raises():
  with pytest.raises(ValueError, match="built for 5-way tasks of dimension 16"):
    build64().adapt(tf.zeros([1, 4, 1, DIM], tf.float64), tf.zeros([1, 4, 1], tf.int32),
                    training=False, seed=SEED)


@pytest.mark.parametrize("overrides, message", [
    ({"key_sizes": "8,x"}, "--snail_key_sizes='8,x'"),
    ({"value_sizes": "4"}, "--snail_key_sizes='8,6,4' and --snail_value_sizes='4'"),
    ({"key_sizes": "", "value_sizes": ""}, "at least one"),
    ({"input_dim": -1}, "--snail_input_dim=-1"),
    ({"tc_filters": 0}, "--snail_tc_filters=0"),
    ({"sequence_length": 1}, "--snail_sequence_length=1"),
    ({"dropout_rate": 1.0}, "--snail_dropout_rate=1.0"),
    ({"dropout_rate": -0.1}, "--snail_dropout_rate=-0.1"),
    ({"start": "cosine"}, "--snail_start='cosine'"),
    ({"start_scale": 0.0}, "--snail_start_scale=0.0"),
])
def test_bad_config_is_a_user_error(overrides, message):
  with pytest.raises(errors.ConfigError, match=message):
    registry.build("snail", snail.Config(**dict(SMALL, **overrides)), NUM_WAYS, DIM)


def test_every_config_field_has_help():
  learner_checks.check_config_fields_have_help(snail.Config)


def test_input_dropout_acts_in_meta_training_only_and_is_stateless():
  """Training steps drop embedding entries (a mask per seed, support and
  queries on their own streams); evaluation equals the dropout-free model."""
  plain, dropped = build64(), build64(dropout_rate=0.5)
  for a, b in zip(plain.trainable_variables, dropped.trainable_variables):
    b.assign(a)
  episode = common.make_episode(seed=7)
  np.testing.assert_array_equal(logits_of(plain, episode), logits_of(dropped, episode))

  def training_steps(learner, seed, **kwargs):
    return learner.steps(episode.support_x, episode.support_y, training=True,
                         seed=tf.constant(seed), **kwargs).numpy()[..., :SMALL["input_dim"]]
  first, again = training_steps(dropped, [1, 2]), training_steps(dropped, [1, 2])
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, training_steps(dropped, [1, 3]))
  assert not np.array_equal(first, training_steps(dropped, [1, 2], stream=snail.QUERY_STREAM))
  np.testing.assert_array_equal(training_steps(plain, [1, 2]), plain.steps(
      episode.support_x, episode.support_y).numpy()[..., :SMALL["input_dim"]])
  # The mask is inverted dropout on the embedding, before the projection P.
  x = episode.support_x.numpy()
  kept = tf.nn.experimental.stateless_dropout(
      episode.support_x, 0.5, seed=tf.random.experimental.stateless_fold_in(
          tf.constant([1, 2]), 0), rng_alg="philox").numpy()
  assert 0.3 < np.mean(kept == 0) < 0.7
  np.testing.assert_allclose(first, kept @ dropped.projection.numpy(), rtol=1e-12)
  np.testing.assert_allclose(kept[kept != 0], 2 * x[kept != 0], rtol=1e-12)


# -- meta-training through the real Trainer ---------------------------------------

def test_meta_trained_snail_learns_to_read_the_support(tmp_path):
  """From the random start a black box starts at chance: it must learn to
  compare and to read the labels (toy problem, NCM 99%: 0.84 after 400 steps, 0.90 after
  600, 0.95 after 1,000; see snail.py for the
  synthetic data)."""
  tf.random.set_seed(0)
  learner_checks.check_meta_training_reaches_ncm(
      snail.build(snail.Config(start="random"), NUM_WAYS, DIM), tmp_path, "SNAIL", steps=400,
      outer_lr=3e-3, margin=0.2)
