"""Tests of the R2D2 learner: closed forms, finite differences, invariants."""

import dataclasses
import math

import numpy as np
import pytest
import tensorflow as tf

from leo_suite import errors
from leo_suite.data.episodes import Episode
from leo_suite.models import base
from leo_suite.models import r2d2

NUM_WAYS = 5
DIM = 12


def unit_rows(rng, shape):
  x = rng.standard_normal(shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_episode(rng, num_tasks=3, num_shots=2, num_queries=3, dim=DIM,
                 permute_labels=False):
  """Random unit-norm episode; optionally the support labels are permuted."""
  support_x = unit_rows(rng, (num_tasks, NUM_WAYS, num_shots, dim))
  query_x = unit_rows(rng, (num_tasks, NUM_WAYS, num_queries, dim))
  labels = np.tile(np.arange(NUM_WAYS)[None, :, None], [num_tasks, 1, 1])
  if permute_labels:
    labels = np.stack([rng.permutation(NUM_WAYS) for _ in range(num_tasks)])
    labels = labels[:, :, None]
  support_y = np.tile(labels, [1, 1, num_shots]).astype(np.int32)
  query_y = np.tile(labels, [1, 1, num_queries]).astype(np.int32)
  return Episode(tf.constant(support_x), tf.constant(support_y),
                 tf.constant(query_x), tf.constant(query_y))


def numpy_features(learner, x):
  x = np.asarray(x, np.float64)
  if learner.projection is not None:
    x = x @ learner.projection.numpy()
    if learner.config.normalize_projection:
      x = x / np.linalg.norm(x, axis=-1, keepdims=True)
  return x


def primal_ridge(x, y, lam):
  """(X^T X + lam I)^-1 X^T Y for one task, in numpy float64."""
  return np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ y)


def reference_logits(learner, episode):
  """Logits by the paper's formulas in numpy (primal form), task by task."""
  cfg = learner.config
  lam = math.exp(learner.log_lambda.numpy())
  scale = learner.scale.numpy()
  out = []
  for b in range(episode.support_x.shape[0]):
    xs = numpy_features(learner, episode.support_x[b]).reshape(-1, learner.feature_dim)
    xq = numpy_features(learner, episode.query_x[b]).reshape(-1, learner.feature_dim)
    if cfg.bias_column:
      xs = np.concatenate([xs, np.ones([len(xs), 1])], 1)
      xq = np.concatenate([xq, np.ones([len(xq), 1])], 1)
    y = np.eye(NUM_WAYS)[episode.support_y[b].numpy().reshape(-1)]
    lam_eff = lam * len(xs) if cfg.scale_by_num_examples else lam
    w = primal_ridge(xs, y, lam_eff)
    out.append((scale * (xq @ w) + learner.adjust_bias.numpy()).reshape(
        episode.query_x.shape[1:3] + (NUM_WAYS,)))
  return np.stack(out)


def build64(**overrides):
  return r2d2.build(r2d2.Config(**overrides), NUM_WAYS, DIM, "float64")


SEED = tf.constant([3, 7], tf.int32)


# -- the closed-form solver -------------------------------------------------

@pytest.mark.parametrize("bias_column", [False, True])
def test_woodbury_equals_primal(bias_column):
  rng = np.random.default_rng(0)
  x = unit_rows(rng, (4, 10, 30))  # M = 10 rows, p = 30 (+1) columns
  if bias_column:
    x = np.concatenate([x, np.ones([4, 10, 1])], -1)
  y = np.eye(NUM_WAYS)[rng.integers(0, NUM_WAYS, (4, 10))]
  for lam in (0.1, 50.0):
    woodbury = r2d2.ridge_woodbury(tf.constant(x), tf.constant(y),
                                   tf.constant(lam, tf.float64)).numpy()
    primal = np.stack([primal_ridge(x[b], y[b], lam) for b in range(4)])
    np.testing.assert_allclose(woodbury, primal, rtol=0, atol=1e-6)
    # The TF primal branch agrees too (it is what M > p uses).
    tf_primal = r2d2.ridge_primal(tf.constant(x), tf.constant(y),
                                  tf.constant(lam, tf.float64)).numpy()
    np.testing.assert_allclose(tf_primal, primal, rtol=0, atol=1e-6)
    # Normal equations hold: (X^T X + lam I) W = X^T Y.
    lhs = np.einsum("bmp,bmq,bqc->bpc", x, x, woodbury) + lam * woodbury
    np.testing.assert_allclose(lhs, np.einsum("bmp,bmc->bpc", x, y), atol=1e-9)


def test_ridge_regression_picks_the_smaller_system():
  rng = np.random.default_rng(1)
  y = tf.constant(np.eye(3)[rng.integers(0, 3, (2, 8))])
  lam = tf.constant(2.0, tf.float64)
  wide = tf.constant(rng.standard_normal((2, 8, 20)))   # M < p: Woodbury
  tall = tf.constant(rng.standard_normal((2, 8, 4)))    # M > p: primal
  for x in (wide, tall):
    np.testing.assert_allclose(r2d2.ridge_regression(x, y, lam).numpy(),
                               r2d2.ridge_woodbury(x, y, lam).numpy(), atol=1e-9)
  # The tall case really takes the primal path: its graph solves a p x p system.
  graph = tf.function(r2d2.ridge_regression).get_concrete_function(tall, y, lam).graph
  chol_shapes = [op.outputs[0].shape.as_list() for op in graph.get_operations()
                 if op.type == "Cholesky"]
  assert chol_shapes == [[2, 4, 4]]


# -- adapt / predict are the closed form --------------------------------------

@pytest.mark.parametrize("overrides", [
    dict(),
    dict(bias_column=False),
    dict(scale_by_num_examples=True),
    dict(projection_dim=4),  # M = 10 > d + 1 = 5: primal branch
    dict(projection_dim=7, normalize_projection=False, log_scale=False,
         scale_init=3.0, lambda_init=0.5),
])
def test_adapt_then_predict_equals_formula(overrides):
  rng = np.random.default_rng(2)
  learner = build64(**overrides)
  learner.adjust_bias.assign(0.3)
  episode = make_episode(rng, permute_labels=True)
  state = learner.adapt(episode.support_x, episode.support_y, training=False,
                        seed=SEED)
  logits = learner.predict(state, episode.query_x, training=False, seed=SEED)
  np.testing.assert_allclose(logits.numpy(), reference_logits(learner, episode),
                             rtol=1e-7, atol=1e-7)
  # The state is the closed-form W (and bias row) of every task.
  weights, bias = state
  lam = learner.config.lambda_init
  for b in range(3):
    xs = numpy_features(learner, episode.support_x[b]).reshape(-1, learner.feature_dim)
    if learner.config.bias_column:
      xs = np.concatenate([xs, np.ones([len(xs), 1])], 1)
    y = np.eye(NUM_WAYS)[episode.support_y[b].numpy().reshape(-1)]
    lam_eff = lam * len(xs) if learner.config.scale_by_num_examples else lam
    w = primal_ridge(xs, y, lam_eff)
    np.testing.assert_allclose(weights[b].numpy(), w[:learner.feature_dim],
                               atol=1e-9)
    expected_bias = w[-1] if learner.config.bias_column else np.zeros(NUM_WAYS)
    np.testing.assert_allclose(bias[b].numpy(), expected_bias, atol=1e-9)


def test_sqrt_scaling_matches_reference_construction():
  """Reference: X (ones column included) and Y divided by sqrt(M), queries not."""
  rng = np.random.default_rng(3)
  learner = build64(scale_by_num_examples=True, lambda_init=2.0)
  episode = make_episode(rng, num_tasks=2, num_shots=3)
  weights, bias = learner.adapt(episode.support_x, episode.support_y,
                                training=False, seed=SEED)
  for b in range(2):
    xs = episode.support_x[b].numpy().reshape(-1, DIM)
    xs = np.concatenate([xs, np.ones([len(xs), 1])], 1)
    m = len(xs)
    y = np.eye(NUM_WAYS)[episode.support_y[b].numpy().reshape(-1)]
    xs_s, y_s = xs / np.sqrt(m), y / np.sqrt(m)
    w = xs_s.T @ np.linalg.solve(xs_s @ xs_s.T + 2.0 * np.eye(m), y_s)
    np.testing.assert_allclose(weights[b].numpy(), w[:DIM], atol=1e-9)
    np.testing.assert_allclose(bias[b].numpy(), w[DIM], atol=1e-9)


@pytest.mark.parametrize("bias_column", [False, True])
def test_targets_are_zero_one_one_hot_of_given_labels(bias_column):
  """Invert the Woodbury map: X W = K (K + lam I)^-1 Y, so Y = (K + lam I) K^-1 X W."""
  rng = np.random.default_rng(4)
  learner = build64(bias_column=bias_column)
  episode = make_episode(rng, num_shots=1, permute_labels=True)
  weights, bias = learner.adapt(episode.support_x, episode.support_y,
                                training=False, seed=SEED)
  lam = learner.config.lambda_init
  for b in range(3):
    xs = episode.support_x[b].numpy().reshape(-1, DIM)
    w = weights[b].numpy()
    if bias_column:
      xs = np.concatenate([xs, np.ones([len(xs), 1])], 1)
      w = np.concatenate([w, bias[b].numpy()[None]], 0)
    gram = xs @ xs.T
    targets = (gram + lam * np.eye(len(xs))) @ np.linalg.solve(gram, xs @ w)
    np.testing.assert_allclose(np.sort(np.unique(np.round(targets, 6))), [0.0, 1.0])
    labels = episode.support_y[b].numpy().reshape(-1)
    np.testing.assert_allclose(targets, np.eye(NUM_WAYS)[labels], atol=1e-8)


# -- meta-gradients -----------------------------------------------------------

def _objective(learner, episode, weights):
  """Query CE plus a fixed linear functional of the logits.

  CE alone is invariant to the adjust layer's scalar bias (zero gradient), so
  the linear term makes the bias path testable.
  """
  state = learner.adapt(episode.support_x, episode.support_y, training=False,
                        seed=SEED)
  logits = learner.predict(state, episode.query_x, training=False, seed=SEED)
  ce = tf.reduce_mean(base.cross_entropy(logits, episode.query_y))
  return ce + tf.reduce_sum(weights * logits)


@pytest.mark.parametrize("log_scale", [True, False])
def test_gradients_match_central_finite_differences(log_scale):
  rng = np.random.default_rng(5)
  learner = build64(learn_lambda=True, log_scale=log_scale, lambda_init=3.0,
                    scale_init=4.0, projection_dim=6)
  learner.adjust_bias.assign(0.2)
  episode = make_episode(rng, num_tasks=2)
  weights = tf.constant(rng.standard_normal((2, NUM_WAYS, 3, NUM_WAYS)) * 0.01)
  variables = learner.trainable_variables
  names = sorted(v.name for v in variables)
  assert names == sorted(["r2d2/log_lambda:0", "r2d2/adjust_bias:0",
                          "r2d2/projection:0",
                          "r2d2/log_scale:0" if log_scale else "r2d2/scale:0"])
  with tf.GradientTape() as tape:
    loss = _objective(learner, episode, weights)
  grads = dict(zip([v.name for v in variables], tape.gradient(loss, variables)))

  def numeric(variable, index=(), step=1e-6):
    original = np.array(variable.numpy())
    values = []
    for sign in (1.0, -1.0):
      shifted = original.copy()
      shifted[index] += sign * step
      variable.assign(shifted)
      values.append(_objective(learner, episode, weights).numpy())
    variable.assign(original)
    return (values[0] - values[1]) / (2 * step)

  for v in variables:
    if v.shape.rank == 0:
      np.testing.assert_allclose(grads[v.name].numpy(), numeric(v),
                                 rtol=1e-6, atol=1e-8, err_msg=v.name)
      assert abs(grads[v.name].numpy()) > 1e-6, v.name  # a real dependence
    else:
      for index in [(0, 0), (3, 5), (11, 2)]:
        np.testing.assert_allclose(grads[v.name].numpy()[index],
                                   numeric(v, index), rtol=1e-6, atol=1e-8)

  # d/d(lambda) itself (chain rule through log lambda) against FD in lambda.
  lam = learner.ridge_lambda.numpy()
  h = 1e-5 * lam
  values = []
  for sign in (1.0, -1.0):
    learner.log_lambda.assign(math.log(lam + sign * h))
    values.append(_objective(learner, episode, weights).numpy())
  learner.log_lambda.assign(math.log(lam))
  np.testing.assert_allclose(grads["r2d2/log_lambda:0"].numpy() / lam,
                             (values[0] - values[1]) / (2 * h), rtol=1e-6)


def test_cross_entropy_is_blind_to_the_adjust_bias():
  rng = np.random.default_rng(6)
  learner = build64()
  episode = make_episode(rng)
  with tf.GradientTape() as tape:
    loss, _ = learner.meta_loss(episode, training=True, seed=SEED)
  grad_bias, grad_scale = tape.gradient(loss, [learner.adjust_bias,
                                               learner.scale_param])
  assert abs(grad_bias.numpy()) < 1e-12
  assert abs(grad_scale.numpy()) > 1e-6


def test_fixed_lambda_is_not_trainable_but_is_checkpointed():
  learner = build64()
  assert "r2d2/log_lambda:0" not in [v.name for v in learner.trainable_variables]
  assert "r2d2/log_lambda:0" in [v.name for v in learner.variables]
  np.testing.assert_allclose(learner.ridge_lambda.numpy(), 50.0)
  np.testing.assert_allclose(learner.scale.numpy(), 500.0)


# -- the common learner checks -----------------------------------------------

def test_adaptation_lowers_the_support_loss():
  rng = np.random.default_rng(7)
  episode = make_episode(rng, num_shots=3)
  losses, residuals = [], []
  for lam in (1e4, 50.0, 1.0, 0.01):
    learner = build64(lambda_init=lam)
    state = learner.adapt(episode.support_x, episode.support_y, training=False,
                          seed=SEED)
    logits = learner.predict(state, episode.support_x, training=False, seed=SEED)
    losses.append(tf.reduce_mean(base.cross_entropy(
        logits, episode.support_y)).numpy())
    weights, bias = state
    fit = tf.einsum("bnkd,bdc->bnkc", episode.support_x, weights) + bias[:, None, None]
    targets = tf.one_hot(episode.support_y, NUM_WAYS, dtype=tf.float64)
    residuals.append(tf.reduce_sum((fit - targets) ** 2).numpy())
  # Unadapted (W = 0) logits are all equal: support loss log N.
  assert losses[1] < math.log(NUM_WAYS) - 0.1
  # The ridge training residual grows with lambda (strictly, for these X).
  assert all(a > b for a, b in zip(residuals, residuals[1:])), residuals
  assert losses[-1] < losses[0]


def test_evaluation_is_deterministic_and_training_uses_the_seed():
  rng = np.random.default_rng(8)
  learner = build64(dropout_rate=0.5, projection_dim=6)
  episode = make_episode(rng)

  def logits(training, seed):
    state = learner.adapt(episode.support_x, episode.support_y,
                          training=training, seed=seed)
    return learner.predict(state, episode.query_x, training=training,
                           seed=seed).numpy()

  seed_a, seed_b = tf.constant([1, 2]), tf.constant([5, 9])
  np.testing.assert_array_equal(logits(False, seed_a), logits(False, seed_b))
  np.testing.assert_array_equal(logits(True, seed_a), logits(True, seed_a))
  assert np.abs(logits(True, seed_a) - logits(True, seed_b)).max() > 1e-3


def test_checkpoint_round_trip_restores_identical_predictions(tmp_path):
  rng = np.random.default_rng(9)
  config = dict(learn_lambda=True, projection_dim=6, dropout_rate=0.1)
  learner = build64(**config)
  episode = make_episode(rng)
  optimizer = tf.keras.optimizers.Adam(0.05)
  for step in range(3):
    _, grads, _ = learner.loss_and_gradients(episode, seed=tf.constant([0, step]))
    optimizer.apply_gradients(zip(grads, learner.trainable_variables))
  path = tf.train.Checkpoint(learner=learner).save(str(tmp_path / "ckpt"))

  def eval_logits(model):
    state = model.adapt(episode.support_x, episode.support_y, training=False,
                        seed=SEED)
    return model.predict(state, episode.query_x, training=False, seed=SEED).numpy()

  fresh = build64(**config)
  before = eval_logits(fresh)
  assert np.abs(before - eval_logits(learner)).max() > 1e-6  # training moved it
  tf.train.Checkpoint(learner=fresh).restore(path).assert_consumed()
  np.testing.assert_array_equal(eval_logits(fresh), eval_logits(learner))


@pytest.mark.parametrize("jit_compile", [False, True])
def test_runs_in_tf_function_with_finite_loss_and_gradients(jit_compile):
  rng = np.random.default_rng(10)
  episode = make_episode(rng, num_tasks=4, num_shots=1, num_queries=4)
  episode = Episode(tf.cast(episode.support_x, tf.float32), episode.support_y,
                    tf.cast(episode.query_x, tf.float32), episode.query_y)
  # Without dropout the traced (and XLA-compiled) step is the eager maths.
  learner = r2d2.build(r2d2.Config(learn_lambda=True, projection_dim=8),
                       NUM_WAYS, DIM, "float32")
  step = tf.function(learner.loss_and_gradients, jit_compile=jit_compile)
  loss, grads, metrics = step(episode, seed=SEED)
  eager_loss, eager_grads, _ = learner.loss_and_gradients(episode, seed=SEED)
  assert np.isfinite(loss.numpy()) and loss.numpy() > 0
  assert set(metrics) >= {"query_loss", "accuracy"}
  np.testing.assert_allclose(loss.numpy(), eager_loss.numpy(), rtol=1e-5)
  for g, eg in zip(grads, eager_grads):
    assert np.all(np.isfinite(g.numpy()))
    np.testing.assert_allclose(g.numpy(), eg.numpy(), rtol=1e-4, atol=1e-5)

  # With dropout: finite and a pure function of the seed. (XLA draws other
  # stateless masks than the non-XLA kernels, so only compare like with like.)
  dropout = r2d2.build(r2d2.Config(learn_lambda=True, projection_dim=8,
                                   dropout_rate=0.2), NUM_WAYS, DIM, "float32")
  step = tf.function(dropout.loss_and_gradients, jit_compile=jit_compile)
  first, second = step(episode, seed=SEED), step(episode, seed=SEED)
  other = step(episode, seed=tf.constant([4, 4]))
  assert np.isfinite(first[0].numpy()) and first[0].numpy() == second[0].numpy()
  assert first[0].numpy() != other[0].numpy()
  for g, g2 in zip(first[1], second[1]):
    assert np.all(np.isfinite(g.numpy()))
    np.testing.assert_array_equal(g.numpy(), g2.numpy())

  # Serving-style signature: unknown task count, static N, K, V, D.
  spec = lambda k: tf.TensorSpec([None, NUM_WAYS, k, DIM], tf.float32)
  adapt = tf.function(lambda x, y: learner.adapt(x, y, training=False, seed=SEED),
                      input_signature=[spec(1), tf.TensorSpec([None, NUM_WAYS, 1],
                                                              tf.int32)])
  predict = tf.function(lambda w, b, q: learner.predict((w, b), q, training=False,
                                                        seed=SEED))
  state = adapt(episode.support_x, episode.support_y)
  logits = predict(*state, episode.query_x)
  assert logits.shape == (4, NUM_WAYS, 4, NUM_WAYS)
  eager_state = learner.adapt(episode.support_x, episode.support_y,
                              training=False, seed=SEED)
  np.testing.assert_allclose(
      logits.numpy(),
      learner.predict(eager_state, episode.query_x, training=False,
                      seed=SEED).numpy(), rtol=1e-4, atol=1e-4)


def test_wrong_shape_raises():
  learner = build64()
  rng = np.random.default_rng(11)
  with pytest.raises(ValueError, match="built for 5-way"):
    learner.adapt(tf.constant(unit_rows(rng, (2, 4, 1, DIM))),
                  tf.zeros([2, 4, 1], tf.int32), training=False, seed=SEED)
  with pytest.raises(ValueError, match="dimension 12"):
    learner.adapt(tf.constant(unit_rows(rng, (2, 5, 1, DIM + 1))),
                  tf.zeros([2, 5, 1], tf.int32), training=False, seed=SEED)


@pytest.mark.parametrize("overrides, message", [
    (dict(lambda_init=0.0), "lambda_init must be > 0"),
    (dict(scale_init=-1.0), "scale_init must be > 0"),
    (dict(projection_dim=-2), "projection_dim must be >= 0"),
    (dict(dropout_rate=1.0), "dropout_rate must be in"),
])
def test_bad_config_is_a_user_error(overrides, message):
  with pytest.raises(errors.ConfigError, match=message):
    r2d2.build(r2d2.Config(**overrides), NUM_WAYS, DIM, "float32")
  # A negative scale is fine when it is learned directly (no log).
  if "scale_init" in overrides:
    r2d2.build(r2d2.Config(log_scale=False, **overrides), NUM_WAYS, DIM)


def test_every_config_field_has_help():
  for name, default, help_text in base.config_fields(r2d2.Config):
    assert help_text, name
    assert isinstance(default, (int, float, bool, str)), name
  assert r2d2.SPEC.flag_prefix == "r2d2_"
  assert dataclasses.is_dataclass(r2d2.Config)


# -- it meta-learns something ---------------------------------------------------

def _sample_episodes(rng, classes, num_tasks, num_shots, num_queries):
  """5-way episodes from a list of [n_c, D] class arrays, L2-normalised."""
  support, query = [], []
  for _ in range(num_tasks):
    chosen = rng.choice(len(classes), NUM_WAYS, replace=False)
    rows = np.stack([classes[c][rng.choice(len(classes[c]), num_shots + num_queries,
                                           replace=False)] for c in chosen])
    rows /= np.linalg.norm(rows, axis=-1, keepdims=True)
    support.append(rows[:, :num_shots])
    query.append(rows[:, num_shots:])
  labels = lambda n: np.tile(np.arange(NUM_WAYS)[None, :, None],
                             [num_tasks, 1, n]).astype(np.int32)
  return Episode(tf.constant(np.stack(support), tf.float32),
                 tf.constant(labels(num_shots)),
                 tf.constant(np.stack(query), tf.float32),
                 tf.constant(labels(num_queries)))


@pytest.mark.slow
def test_learned_projection_transfers_to_unseen_classes():
  """On the suite's synthetic embeddings (class signal in a shared subspace,
  strong nuisance), meta-learning the D -> d projection on train classes
  raises 1-shot accuracy on disjoint test classes well above the plain head."""
  from leo_suite.data import synthetic  # pylint: disable=g-import-not-at-top
  data = synthetic.generate()

  def by_class(split):
    keys, rows = data[split]
    names = [k.split("-")[1] for k in keys]
    return [rows[[i for i, n in enumerate(names) if n == c]]
            for c in dict.fromkeys(names)]

  train, test = by_class("train"), by_class("test")
  dim = train[0].shape[1]
  test_episodes = _sample_episodes(np.random.default_rng(1), test, 60, 1, 10)
  zero = tf.constant([0, 0])

  def test_accuracy(learner):
    return learner.meta_loss(test_episodes, training=False,
                             seed=zero)[1]["accuracy"].numpy()

  plain = r2d2.build(r2d2.Config(), NUM_WAYS, dim)
  learner = r2d2.build(r2d2.Config(projection_dim=32), NUM_WAYS, dim)
  optimizer = tf.keras.optimizers.Adam(1e-2)

  @tf.function
  def train_step(episode, seed):
    loss, grads, _ = learner.loss_and_gradients(episode, seed=seed)
    optimizer.apply_gradients(zip(grads, learner.trainable_variables))
    return loss

  rng = np.random.default_rng(0)
  for step in range(100):
    train_step(_sample_episodes(rng, train, 8, 1, 5), tf.constant([0, step]))
  plain_accuracy, learned_accuracy = test_accuracy(plain), test_accuracy(learner)
  print(f"1-shot test accuracy: plain {plain_accuracy:.3f}, learned projection "
        f"{learned_accuracy:.3f}")
  assert learned_accuracy > plain_accuracy + 0.2, (plain_accuracy, learned_accuracy)
