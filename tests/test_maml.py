"""MAML / Meta-SGD: inner-loop maths on a quadratic (closed forms and finite
differences, float64), the closed-form head gradients, and the checks every
learner must pass (shared with tests/test_l2f.py)."""

import numpy as np
import pytest
import tensorflow as tf

from leo_suite import errors
from leo_suite.data.episodes import Episode
from leo_suite.models import adaptation
from leo_suite.models import base
from leo_suite.models import heads
from leo_suite.models import maml

NUM_WAYS, DIM = 5, 16


# -- quadratic: theta' = theta - alpha A^T (A theta - b) -----------------------

def quadratic_problem(seed=0, dim=4, rows=6):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(rows, dim)) / np.sqrt(rows)
  b = rng.normal(size=rows)
  c = rng.normal(size=(rows, dim)) / np.sqrt(rows)
  d = rng.normal(size=rows)
  theta = rng.normal(size=dim)
  return a, b, c, d, theta


def inner_quadratic(a, b):
  """L_in(theta) = 0.5 ||A theta - b||^2 as a loss_fn over [theta]."""
  a, b = tf.constant(a), tf.constant(b)
  return lambda params: 0.5 * tf.reduce_sum(
      tf.square(tf.linalg.matvec(a, params[0]) - b))


def outer_quadratic(c, d, theta_adapted):
  """L_out(theta') = 0.5 ||C theta' - d||^2."""
  return 0.5 * tf.reduce_sum(tf.square(tf.linalg.matvec(tf.constant(c),
                                                        theta_adapted) - d))


def meta_objective(problem, theta, alpha, steps, first_order=False):
  a, b, c, d, _ = problem
  adapted = maml.inner_loop(inner_quadratic(a, b), [theta], alpha, steps,
                            first_order)
  return outer_quadratic(c, d, adapted[0]), adapted[0]


def central_difference(fn, x, eps=1e-6):
  x = np.asarray(x, np.float64)
  grad = np.zeros_like(x)
  for i in range(x.size):
    step = np.zeros_like(x)
    step.flat[i] = eps
    grad.flat[i] = (fn(x + step) - fn(x - step)) / (2 * eps)
  return grad


@pytest.mark.parametrize("steps", [1, 3])
def test_meta_gradient_matches_closed_forms_and_finite_differences(steps):
  problem = quadratic_problem()
  a, b, c, d, theta0 = problem
  alpha = 0.3
  jacobian = np.eye(theta0.size) - alpha * a.T @ a  # d theta_{t+1} / d theta_t
  expected_adapted = theta0
  for _ in range(steps):
    expected_adapted = expected_adapted - alpha * a.T @ (a @ expected_adapted - b)
  outer_grad = c.T @ (c @ expected_adapted - d)  # dL_out/dtheta' at theta'
  expected_second = np.linalg.matrix_power(jacobian, steps).T @ outer_grad

  grads = {}
  for first_order in (False, True):
    theta = tf.constant(theta0)
    with tf.GradientTape() as tape:
      tape.watch(theta)
      loss, adapted = meta_objective(problem, theta, alpha, steps, first_order)
    np.testing.assert_allclose(adapted.numpy(), expected_adapted, rtol=1e-12)
    grads[first_order] = tape.gradient(loss, theta).numpy()

  np.testing.assert_allclose(grads[False], expected_second, rtol=1e-10)
  np.testing.assert_allclose(grads[True], outer_grad, rtol=1e-10)  # dtheta'/dtheta = I
  finite_diff = central_difference(
      lambda t: meta_objective(problem, tf.constant(t), alpha, steps)[0].numpy(),
      theta0)
  np.testing.assert_allclose(grads[False], finite_diff, rtol=1e-6, atol=1e-8)
  # The two orders genuinely differ here, so the checks above discriminate.
  assert np.max(np.abs(grads[False] - grads[True])) > 1e-2


def test_meta_sgd_rate_gradient_matches_closed_form_and_finite_differences():
  problem = quadratic_problem(seed=1)
  a, b, c, d, theta0 = problem
  rates0 = np.linspace(0.1, 0.5, theta0.size)  # one step size per element
  inner_grad = a.T @ (a @ theta0 - b)
  adapted = theta0 - rates0 * inner_grad
  # d L_out / d alpha_i = (C^T (C theta' - d))_i * (-g_i)
  expected = -(c.T @ (c @ adapted - d)) * inner_grad
  for first_order in (False, True):  # rates get gradients in both orders
    rates = tf.constant(rates0)
    with tf.GradientTape() as tape:
      tape.watch(rates)
      loss, _ = meta_objective(problem, tf.constant(theta0), [rates], 1,
                               first_order)
    np.testing.assert_allclose(tape.gradient(loss, rates).numpy(), expected,
                               rtol=1e-10)
  finite_diff = central_difference(
      lambda r: meta_objective(problem, tf.constant(theta0),
                               [tf.constant(r)], 1)[0].numpy(), rates0)
  np.testing.assert_allclose(expected, finite_diff, rtol=1e-6, atol=1e-9)


def test_inner_loop_rejects_mismatched_rates():
  with pytest.raises(ValueError, match="2 learning rates for 1 params"):
    maml.inner_loop(lambda p: tf.reduce_sum(p[0]), [tf.ones([2])], [0.1, 0.2], 1)


# -- closed-form head gradients -------------------------------------------------

@pytest.mark.parametrize("hidden_sizes", [(), (7, 3)])
def test_closed_form_head_gradients_match_autodiff_to_second_order(hidden_sizes):
  rng = np.random.default_rng(2)
  head = heads.HeadParams(NUM_WAYS, DIM, hidden_sizes, dtype=tf.float64)
  fast = [p + tf.constant(0.3 * rng.normal(size=(3,) + tuple(p.shape)))
          for p in head.params]
  x = tf.constant(rng.normal(size=(3, NUM_WAYS, 2, DIM)))
  y = tf.constant(rng.integers(0, NUM_WAYS, size=(3, NUM_WAYS, 2)), tf.int32)
  loss_fn = lambda p: tf.reduce_sum(heads.task_mean_cross_entropy(
      heads.head_logits(p, x), y))
  probe = [tf.constant(rng.normal(size=p.shape)) for p in fast]

  def probed_gradient(grads):  # a scalar function of the gradients
    return tf.add_n([tf.reduce_sum(g * v) for g, v in zip(grads, probe)])

  with tf.GradientTape(persistent=True) as tape:
    tape.watch(fast)
    _, autodiff = adaptation.loss_gradients(loss_fn, fast)
    closed_form = heads.head_cross_entropy_gradients(fast, x, y)
    autodiff_probe = probed_gradient(autodiff)
    closed_form_probe = probed_gradient(closed_form)
  for g_auto, g_closed in zip(autodiff, closed_form):
    np.testing.assert_allclose(g_closed.numpy(), g_auto.numpy(), atol=1e-13)
  # Hessian-vector products: what second-order MAML differentiates.
  for h_auto, h_closed in zip(tape.gradient(autodiff_probe, fast),
                              tape.gradient(closed_form_probe, fast)):
    np.testing.assert_allclose(h_closed.numpy(), h_auto.numpy(), atol=1e-12)
    assert np.max(np.abs(h_auto.numpy())) > 1e-3


def test_parse_hidden_sizes():
  assert heads.parse_hidden_sizes("") == ()
  assert heads.parse_hidden_sizes(" 128, 64 ") == (128, 64)
  for bad in ("128,", "a", "0", "-3", "1.5"):
    with pytest.raises(errors.ConfigError, match="--maml_hidden_sizes"):
      heads.parse_hidden_sizes(bad, "maml_hidden_sizes")


# -- shared helpers for learner checks (also used by tests/test_l2f.py) ---------

def unit_rows(rng, shape):
  x = rng.normal(size=shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_episode(seed=0, num_tasks=3, num_shots=2, num_queries=3, dim=DIM,
                 dtype=np.float64):
  """Separable synthetic tasks: class prototypes plus noise, unit norm."""
  rng = np.random.default_rng(seed)
  protos = unit_rows(rng, (num_tasks, NUM_WAYS, 1, dim))
  def draw(count):
    x = protos + 0.3 * unit_rows(rng, (num_tasks, NUM_WAYS, count, dim))
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    y = np.broadcast_to(np.arange(NUM_WAYS)[None, :, None],
                        (num_tasks, NUM_WAYS, count)).astype(np.int32)
    return tf.constant(x.astype(dtype)), tf.constant(y)
  support_x, support_y = draw(num_shots)
  query_x, query_y = draw(num_queries)
  return Episode(support_x, support_y, query_x, query_y)


def per_task_support_loss(learner, fast_weights, episode):
  logits = learner.predict(fast_weights, episode.support_x, training=False,
                           seed=tf.constant([0, 0]))
  loss = base.cross_entropy(logits, episode.support_y)
  return tf.reduce_mean(tf.reshape(loss, [loss.shape[0], -1]), axis=1).numpy()


def perturb_variables(learner, seed):
  rng = np.random.default_rng(seed)
  for v in learner.trainable_variables:
    v.assign(v + tf.constant(0.1 * rng.normal(size=v.shape), v.dtype))


SEED = tf.constant([3, 4])


def check_adaptation_lowers_support_loss(learner):
  episode = make_episode(num_shots=1)
  start = learner.initial_fast_weights(
      tf.cast(episode.support_x, learner.dtype), episode.support_y)
  before = per_task_support_loss(learner, start, episode)
  for training in (True, False):
    adapted = learner.adapt(episode.support_x, episode.support_y,
                            training=training, seed=SEED)
    after = per_task_support_loss(learner, adapted, episode)
    assert np.all(after < before - 1e-3), (training, before, after)


def check_evaluation_is_deterministic(learner):
  episode = make_episode()
  def evaluate(seed):
    state = learner.adapt(episode.support_x, episode.support_y,
                          training=False, seed=tf.constant(seed))
    return learner.predict(state, episode.query_x, training=False,
                           seed=tf.constant(seed)).numpy()
  first = evaluate([1, 2])
  np.testing.assert_array_equal(first, evaluate([1, 2]))
  np.testing.assert_array_equal(first, evaluate([7, 9]))
  assert first.shape == (3, NUM_WAYS, 3, NUM_WAYS)


def check_checkpoint_round_trip(build_learner, tmp_path):
  episode = make_episode()
  saved = build_learner()
  perturb_variables(saved, seed=5)
  def logits(learner):
    state = learner.adapt(episode.support_x, episode.support_y,
                          training=False, seed=SEED)
    return learner.predict(state, episode.query_x, training=False,
                           seed=SEED).numpy()
  expected = logits(saved)
  path = tf.train.Checkpoint(learner=saved).save(str(tmp_path / "ckpt"))
  restored = build_learner()
  assert not np.allclose(logits(restored), expected)  # restoring matters
  tf.train.Checkpoint(learner=restored).restore(path).assert_consumed()
  np.testing.assert_array_equal(logits(restored), expected)


def check_finite_loss_and_gradients_in_tf_function(learner, jit_compile):
  episode = make_episode(dtype=np.float32)
  step = tf.function(lambda e, s: learner.loss_and_gradients(e, seed=s),
                     jit_compile=jit_compile)
  loss, grads, metrics = step(episode, SEED)
  eager_loss, eager_grads, _ = learner.loss_and_gradients(episode, seed=SEED)
  assert np.isfinite(loss.numpy())
  assert len(grads) == len(learner.trainable_variables)
  for g, eager_g, v in zip(grads, eager_grads, learner.trainable_variables):
    assert g.shape == v.shape
    assert np.all(np.isfinite(g.numpy()))
    assert np.max(np.abs(g.numpy())) > 0, v.name  # every variable is trained
    np.testing.assert_allclose(g.numpy(), eager_g.numpy(), rtol=2e-3, atol=1e-6)
  np.testing.assert_allclose(loss.numpy(), eager_loss.numpy(), rtol=1e-5)
  assert 0.0 <= metrics["accuracy"].numpy() <= 1.0


# -- the MAML learner -----------------------------------------------------------

def build64(**overrides):
  return maml.build(maml.Config(**overrides), NUM_WAYS, DIM, "float64")


def test_one_inner_step_is_the_mean_cross_entropy_gradient_step():
  """Documents the loss scale: alpha multiplies grad of the MEAN support CE."""
  learner = build64(inner_steps=1, inner_lr=0.7)
  perturb_variables(learner, seed=1)
  episode = make_episode(num_shots=2)
  w, b = (p.numpy() for p in learner.head.params)
  x = episode.support_x.numpy().reshape(3, -1, DIM)
  y = np.eye(NUM_WAYS)[episode.support_y.numpy().reshape(3, -1)]
  logits = x @ w + b
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  count = x.shape[1]  # N * K
  expected_w = w - 0.7 * np.einsum("bmd,bmo->bdo", x, probs - y) / count
  expected_b = b - 0.7 * (probs - y).sum(1) / count
  w_adapted, b_adapted = learner.adapt(episode.support_x, episode.support_y,
                                       training=True, seed=SEED)
  np.testing.assert_allclose(w_adapted.numpy(), expected_w, rtol=1e-12)
  np.testing.assert_allclose(b_adapted.numpy(), expected_b, rtol=1e-12)


def test_training_and_evaluation_use_their_own_step_counts():
  learner = build64(inner_steps=1, eval_inner_steps=3, inner_lr=0.5)
  episode = make_episode()
  x = episode.support_x
  loss_fn = learner.support_loss_fn(x, episode.support_y)
  theta = learner.head.tiled(3)
  for training, steps in ((True, 1), (False, 3)):
    expected = maml.inner_loop(loss_fn, theta, 0.5, steps)  # autodiff gradients
    adapted = learner.adapt(x, episode.support_y, training=training, seed=SEED)
    for e, a in zip(expected, adapted):
      np.testing.assert_allclose(a.numpy(), e.numpy(), rtol=1e-12, atol=1e-15)


def test_tasks_are_adapted_independently():
  learner = build64(hidden_sizes="8")
  episode = make_episode(num_tasks=3)
  together = learner.adapt(episode.support_x, episode.support_y, training=True,
                           seed=SEED)
  alone = learner.adapt(episode.support_x[1:2], episode.support_y[1:2],
                        training=True, seed=SEED)
  for t, a in zip(together, alone):
    np.testing.assert_allclose(t[1:2].numpy(), a.numpy(), rtol=1e-12)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("head_init", ["zeros", "proto"])
def test_linear_inner_loop_equals_gradient_steps_on_the_weights(first_order, head_init):
  """adaptation.linear_inner_loop (steps on the support logits, the path MAML's
  linear head takes) gives the fast weights of explicit steps on W and b with
  autodiff gradients, and the same second- or first-order meta-gradients."""
  episode = make_episode(num_shots=3, num_tasks=4)
  learner = build64(head_init=head_init, inner_steps=4)
  perturb_variables(learner, seed=5)
  x = tf.cast(episode.support_x, tf.float64)
  rates = [tf.constant(0.7, tf.float64), tf.constant(1.9, tf.float64)]

  def query_loss(adapt):
    with tf.GradientTape() as tape:
      start = learner.initial_fast_weights(x, episode.support_y)
      fast = adapt(start)
      logits = heads.head_logits(fast, tf.cast(episode.query_x, tf.float64))
      loss = tf.reduce_mean(base.cross_entropy(logits, episode.query_y))
    return fast, tape.gradient(loss, learner.head.params)

  explicit = query_loss(lambda start: maml.inner_loop(
      learner.support_loss_fn(x, episode.support_y), start, rates, 4, first_order))
  logit_space = query_loss(lambda start: adaptation.linear_inner_loop(
      start, x, episode.support_y, rates, 4, first_order))
  for e, k in zip(explicit[0] + explicit[1], logit_space[0] + logit_space[1]):
    np.testing.assert_allclose(k.numpy(), e.numpy(), rtol=1e-10, atol=1e-13)
  assert float(tf.norm(explicit[0][0] - learner.initial_fast_weights(
      x, episode.support_y)[0])) > 0.1  # the steps moved the head


def test_first_order_meta_gradient_ignores_the_inner_jacobian():
  episode = make_episode()
  second = build64(hidden_sizes="8")
  first = build64(hidden_sizes="8", first_order=True)
  _, grads_second, _ = second.loss_and_gradients(episode, seed=SEED)
  _, grads_first, _ = first.loss_and_gradients(episode, seed=SEED)
  # First order: d L_query / d theta equals d L_query / d theta' at theta'.
  adapted = [tf.constant(p) for p in first.adapt(
      episode.support_x, episode.support_y, training=True, seed=SEED)]
  with tf.GradientTape() as tape:
    tape.watch(adapted)
    logits = first.predict(adapted, episode.query_x, training=True, seed=SEED)
    loss = tf.reduce_mean(base.cross_entropy(logits, episode.query_y))
  direct = [tf.reduce_sum(g, axis=0) for g in tape.gradient(loss, adapted)]
  for g_first, g_direct, g_second in zip(grads_first, direct, grads_second):
    np.testing.assert_allclose(g_first.numpy(), g_direct.numpy(), rtol=1e-10,
                               atol=1e-14)
  assert max(np.max(np.abs((a - b).numpy()))
             for a, b in zip(grads_first, grads_second)) > 1e-4


def test_second_order_learner_gradient_matches_finite_differences():
  learner = build64(inner_steps=2, inner_lr=2.0)
  perturb_variables(learner, seed=3)
  episode = make_episode(num_shots=1)
  _, grads, _ = learner.loss_and_gradients(episode, seed=SEED)
  bias = learner.head.params[1]
  def loss_at(values):
    old = bias.numpy()
    bias.assign(values)
    loss = learner.meta_loss(episode, training=True, seed=SEED)[0].numpy()
    bias.assign(old)
    return loss
  np.testing.assert_allclose(grads[1].numpy(),
                             central_difference(loss_at, bias.numpy()),
                             rtol=1e-6, atol=1e-9)
  w = learner.head.params[0]
  rng = np.random.default_rng(0)
  direction = rng.normal(size=w.shape)
  def loss_along(t):
    old = w.numpy()
    w.assign(old + t[0] * direction)
    loss = learner.meta_loss(episode, training=True, seed=SEED)[0].numpy()
    w.assign(old)
    return loss
  np.testing.assert_allclose(np.sum(grads[0].numpy() * direction),
                             central_difference(loss_along, np.zeros(1))[0],
                             rtol=1e-6)


def test_meta_sgd_rates_start_at_inner_lr_and_are_trained():
  learner = build64(meta_sgd=True, inner_lr=0.25, hidden_sizes="8")
  assert len(learner.inner_lrs) == len(learner.head.params)
  for rate, param in zip(learner.inner_lrs, learner.head.params):
    assert rate.shape == param.shape
    np.testing.assert_array_equal(rate.numpy(), 0.25)
  trainable = {id(v) for v in learner.trainable_variables}
  assert all(id(r) in trainable for r in learner.inner_lrs)
  assert len(learner.trainable_variables) == 2 * len(learner.head.params)
  _, grads, _ = learner.loss_and_gradients(make_episode(), seed=SEED)
  by_id = {id(v): g for v, g in zip(learner.trainable_variables, grads)}
  for rate in learner.inner_lrs:
    assert np.max(np.abs(by_id[id(rate)].numpy())) > 0
  # Plain MAML has no learned rates.
  assert len(build64().trainable_variables) == 2


@pytest.mark.parametrize("overrides", [{}, {"hidden_sizes": "8"},
                                       {"meta_sgd": True}])
def test_adaptation_lowers_the_support_loss(overrides):
  check_adaptation_lowers_support_loss(build64(**overrides))


def test_evaluation_is_deterministic():
  check_evaluation_is_deterministic(build64(hidden_sizes="8"))


def test_checkpoint_round_trip_restores_identical_predictions(tmp_path):
  check_checkpoint_round_trip(lambda: build64(meta_sgd=True), tmp_path)


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("overrides", [{}, {"hidden_sizes": "8",
                                            "meta_sgd": True}])
def test_runs_in_tf_function_with_finite_loss_and_gradients(jit_compile,
                                                            overrides):
  learner = maml.build(maml.Config(**overrides), NUM_WAYS, DIM, "float32")
  check_finite_loss_and_gradients_in_tf_function(learner, jit_compile)


def test_wrong_shape_raises():
  learner = build64()
  with pytest.raises(ValueError, match="built for 5-way tasks of dimension 16"):
    learner.adapt(tf.zeros([1, 4, 1, DIM], tf.float64),
                  tf.zeros([1, 4, 1], tf.int32), training=False, seed=SEED)


@pytest.mark.parametrize("overrides, message", [
    ({"inner_lr": 0.0}, "--maml_inner_lr=0.0"),
    ({"eval_inner_steps": -1}, "--maml_eval_inner_steps=-1"),
    ({"hidden_sizes": "64,x"}, "--maml_hidden_sizes='64,x'"),
])
def test_bad_config_is_a_user_error(overrides, message):
  with pytest.raises(errors.ConfigError, match=message):
    build64(**overrides)


def test_every_config_field_has_help():
  for name, default, help_text in base.config_fields(maml.Config):
    assert len(help_text) > 20, name
    assert isinstance(default, (int, float, bool, str)), name


# -- output-layer initialisation (heads.HEAD_INITS) --------------------------------

def test_zero_head_one_step_is_the_centred_class_mean_classifier():
  """From W_out = 0 the softmax is uniform, so one step of size alpha on the
  mean CE gives W_c = alpha/N (mean of class c - mean of all), b = 0."""
  alpha, num_shots = 0.7, 2
  learner = build64(inner_steps=1, inner_lr=alpha)  # head_init="zeros"
  assert all(np.all(p.numpy() == 0) for p in learner.head.params)
  episode = make_episode(num_shots=num_shots)
  w, b = learner.adapt(episode.support_x, episode.support_y, training=True,
                       seed=SEED)
  x = episode.support_x.numpy()                      # [B, N, K, D]
  class_means = x.mean(axis=2)                       # [B, N, D]
  centred = class_means - x.mean(axis=(1, 2))[:, None]
  np.testing.assert_allclose(w.numpy(), alpha / NUM_WAYS *
                             np.swapaxes(centred, 1, 2), rtol=1e-12, atol=1e-15)
  np.testing.assert_allclose(b.numpy(), 0.0, atol=1e-15)
  logits = learner.predict([w, b], episode.query_x, training=False, seed=SEED)
  prototype = np.einsum("bnvd,bcd->bnvc", episode.query_x.numpy(), centred)
  np.testing.assert_array_equal(np.argmax(logits.numpy(), -1),
                                np.argmax(prototype, -1))


def test_head_init_zeros_only_zeroes_the_output_layer():
  tf.random.set_seed(11)
  zeros = build64(hidden_sizes="8", head_init="zeros")
  tf.random.set_seed(11)
  glorot = build64(hidden_sizes="8", head_init="glorot")
  w1_z, b1_z, w2_z, b2_z = (p.numpy() for p in zeros.head.params)
  w1_g, b1_g, w2_g, b2_g = (p.numpy() for p in glorot.head.params)
  np.testing.assert_array_equal(w1_z, w1_g)          # hidden layer: Glorot
  assert np.abs(w1_z).max() > 0.1
  np.testing.assert_array_equal(w2_z, 0.0)
  limit = np.sqrt(6.0 / (8 + NUM_WAYS))
  assert np.abs(w2_g).max() > 0.5 * limit and np.abs(w2_g).max() <= limit
  for bias in (b1_z, b2_z, b1_g, b2_g):
    np.testing.assert_array_equal(bias, 0.0)
  with pytest.raises(errors.ConfigError, match="--maml_head_init='normal'"):
    build64(head_init="normal")


def test_signed_identity_hidden_layer_passes_the_embedding_and_starts_at_the_mean_dot():
  """W_1 = [I, -I, Glorot]: ReLU(x W_1) holds ReLU(x) and ReLU(-x); on
  non-negative features a zero output layer after one step scores like the
  unnormalised class-mean dot product, i.e. nearest class mean at 1-shot."""
  tf.random.set_seed(5)
  learner = build64(hidden_sizes=str(2 * DIM + 8), hidden_init="signed_identity",
                    inner_steps=1, inner_lr=0.5)
  w_1 = learner.head.params[0].numpy()
  np.testing.assert_array_equal(w_1[:, :2 * DIM], np.concatenate([np.eye(DIM), -np.eye(DIM)], 1))
  assert np.abs(w_1[:, 2 * DIM:]).max() > 0                   # the rest stays random
  x = np.random.default_rng(0).normal(size=[4, DIM])
  hidden = np.maximum(x @ w_1, 0.0)
  np.testing.assert_allclose(hidden[:, :DIM] - hidden[:, DIM:2 * DIM], x, atol=1e-12)
  # 1-shot, non-negative unit features: argmax = cosine nearest class mean.
  learner = build64(hidden_sizes=str(2 * DIM), hidden_init="signed_identity",
                    inner_steps=1, inner_lr=0.5)
  episode = make_episode(num_shots=1, num_queries=6)
  support, query = (np.abs(t.numpy()) for t in (episode.support_x, episode.query_x))
  state = learner.adapt(tf.constant(support), episode.support_y, training=False, seed=SEED)
  logits = learner.predict(state, tf.constant(query), training=False, seed=SEED).numpy()
  unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
  ncm = np.einsum("bnvd,bcd->bnvc", unit(query), unit(support[:, :, 0]))
  np.testing.assert_array_equal(np.argmax(logits, -1), np.argmax(ncm, -1))
  with pytest.raises(errors.ConfigError, match="--maml_hidden_init=signed_identity needs "
                     "a first hidden layer of at least 2 x 16 = 32 units"):
    build64(hidden_sizes="20", hidden_init="signed_identity")
  with pytest.raises(errors.ConfigError, match="--maml_hidden_init='eye'"):
    build64(hidden_init="eye")


# -- meta-training through the real Trainer, LEO's sampler (random slots) ------

def random_slot_splits(seed=0, dim=16, images=12):
  """Train/test splits like ReLU embeddings: a strong shared direction plus a
  weaker class signal and noise (after L2 normalisation all cosines are high,
  as on Omniglot). The sampler assigns classes to slots at random."""
  from leo_suite.data import embeddings
  rng = np.random.default_rng(seed)
  common = unit_rows(rng, (dim,))
  def split(num_classes):
    centers = unit_rows(rng, (num_classes, 1, dim))
    x = (common + 0.5 * centers +
         0.3 * rng.normal(size=(num_classes, images, dim)) / np.sqrt(dim))
    labels = np.repeat(np.arange(num_classes), images)
    return embeddings.split_from_labels(x.reshape(-1, dim), labels)
  return split(40), split(20)


def meta_train_and_score(learner, tmp_path, steps=60, outer_lr=3e-3,
                         num_shots=1, outer=None):
  """(test accuracy after `steps` Trainer steps, NCM accuracy, accuracy at
  init) on 200 fixed 5-way test tasks; LEO's clipping 0.1/0.1 and Adam
  unless `outer` (an optim.OuterConfig) is given."""
  from leo_suite.data import episodes
  from leo_suite.pretrain import baselines
  from leo_suite.training import evaluation
  from leo_suite.training import optim
  from leo_suite.training import trainer as trainer_lib
  train, test = random_slot_splits()
  spec = episodes.EpisodeSpec(NUM_WAYS, num_shots, 5)
  sampler = episodes.EpisodeSampler(train, spec, "meta-training", learner.dtype)
  test_set = episodes.EpisodeSampler(test, spec, "meta-test",
                                     learner.dtype).fixed_set(1, 200, 100)
  config = trainer_lib.TrainConfig(
      checkpoint_path=str(tmp_path), num_steps_limit=steps,
      metatrain_batch_size=8, checkpoint_steps=10**6, log_steps=10**6,
      outer=outer or optim.OuterConfig(learning_rate=outer_lr))
  trainer = trainer_lib.Trainer(learner, config, sampler)
  evaluator = evaluation.Evaluator(learner)
  at_init = evaluator.evaluate(test_set).accuracy
  assert trainer.train() == steps
  ncm = evaluation.evaluate_baseline(baselines.ncm_cosine_logits, test_set)
  return evaluator.evaluate(test_set).accuracy, ncm.accuracy, at_init


def test_meta_trained_maml_matches_the_class_mean_baseline(tmp_path):
  learner = maml.build(maml.Config(), NUM_WAYS, DIM, "float32")
  accuracy, ncm, _ = meta_train_and_score(learner, tmp_path)
  assert ncm > 0.5  # the problem is learnable, chance is 0.2
  assert accuracy >= ncm - 0.03, (accuracy, ncm)
