"""Meta-LSTM and the L2L LSTM optimiser: the preprocessing, the exact
reduction to SGD (and then to first-order MAML's meta-gradient), the
trajectory loss, and the checks every learner must pass (tests/test_maml.py)."""

import math

import numpy as np
import pytest
import tensorflow as tf

from leo_suite import errors
from leo_suite.models import base
from leo_suite.models import maml
from leo_suite.models import meta_lstm
from leo_suite.training import optim
from tests import test_maml as common

NUM_WAYS, DIM, SEED = common.NUM_WAYS, common.DIM, common.SEED


def build64(**overrides):
  overrides.setdefault("hidden_sizes", "8")  # small MLP head: fast, still nonlinear
  return meta_lstm.build(meta_lstm.Config(**overrides), NUM_WAYS, DIM, "float64")


def test_preprocessing_on_both_sides_of_the_threshold():
  p = 10.0
  # e^-10 = 4.54e-5: 2e-4 is above the threshold, -3e-6 and 0 below.
  x = tf.constant([1.0, -math.exp(-5.0), 2e-4, -3e-6, 0.0, math.exp(-p)], tf.float64)
  out = meta_lstm.preprocess(x, p).numpy()
  expected = [[0.0, 1.0], [-0.5, -1.0], [math.log(2e-4) / p, 1.0],
              [-1.0, -3e-6 * math.exp(p)], [-1.0, 0.0], [-1.0, 1.0]]
  np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-15)
  # No NaN leaks from the unselected log(0) branch into gradients.
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = tf.reduce_sum(meta_lstm.preprocess(x, p))
  assert np.all(np.isfinite(tape.gradient(y, x).numpy()))


def make_sgd(learner, alpha):
  """f_t = sigmoid(40) = 1 exactly in float64, i_t = alpha: gates ignore inputs."""
  rule = learner.update_rule
  for w in (rule.w_f, rule.w_i):
    w.assign(tf.zeros_like(w))
  rule.b_f.assign(40.0)
  rule.b_i.assign(math.log(alpha / (1.0 - alpha)))


@pytest.mark.parametrize("overrides", [{}, {"lstm_units": 3}, {"hidden_sizes": ""},
                                       {"gate_feedback": "gate"}])
def test_forget_gate_one_and_input_gate_alpha_is_exactly_sgd(overrides):
  alpha, steps = 0.7, 3
  learner = build64(inner_steps=steps, **overrides)
  common.perturb_variables(learner, seed=0)
  make_sgd(learner, alpha)
  episode = common.make_episode()
  expected = maml.inner_loop(learner.support_loss_fn(episode.support_x, episode.support_y),
                             learner.head.tiled(3), alpha, steps)  # autodiff gradients
  for training in (True, False):
    adapted = learner.adapt(episode.support_x, episode.support_y, training=training,
                            seed=SEED)
    for e, a in zip(expected, adapted):
      np.testing.assert_allclose(a.numpy(), e.numpy(), rtol=1e-12, atol=1e-14)


def test_sgd_setting_meta_gradient_is_first_order_maml():
  """With the gradient inputs held constant (the paper ignores their second
  derivatives), d theta_T / d c_0 = I when f = 1 and the gates ignore theta:
  the meta-gradient on c_0 is first-order MAML's, not MAML's."""
  alpha, steps = 0.6, 2
  learner = build64(inner_steps=steps)
  common.perturb_variables(learner, seed=1)
  make_sgd(learner, alpha)
  episode = common.make_episode()
  _, grads, _ = learner.loss_and_gradients(episode, seed=SEED)
  by_var = {v.ref(): g.numpy() for v, g in zip(learner.trainable_variables, grads)}
  orders = {}
  for first_order in (True, False):
    reference = maml.build(maml.Config(hidden_sizes="8", inner_steps=steps, inner_lr=alpha,
                                       first_order=first_order), NUM_WAYS, DIM, "float64")
    for p, q in zip(reference.head.params, learner.head.params):
      p.assign(q)
    _, orders[first_order], _ = reference.loss_and_gradients(episode, seed=SEED)
  for p, g_first, g_second in zip(learner.head.params, orders[True], orders[False]):
    np.testing.assert_allclose(by_var[p.ref()], g_first.numpy(), rtol=1e-10, atol=1e-14)
  assert max(np.abs(a.numpy() - b.numpy()).max()
             for a, b in zip(orders[True], orders[False])) > 1e-4  # the orders differ
  # The input gate's meta-parameters are trained too (the forget gate is
  # saturated at sigmoid(40) = 1 here, so its gradient is 0).
  rule = learner.update_rule
  for v in (rule.w_i, rule.b_i):
    assert np.abs(by_var[v.ref()]).max() > 0, v.name


def test_gates_update_is_the_papers_cell_equation():
  """One step by hand: c_1 = f_1 c_0 - i_1 grad_1 with the gates' inputs
  [x_1, theta_0, gate_0 = 0] (lstm_units = 0: x = preprocessed grad, loss)."""
  learner = build64(inner_steps=1, head_init="glorot")
  common.perturb_variables(learner, seed=2)
  episode = common.make_episode(num_tasks=2)
  theta = learner.flatten(learner.head.tiled(2)).numpy()
  frozen = learner.head.tiled(2)
  grad = learner.flatten(learner.support_gradient_fn(
      episode.support_x, episode.support_y)(frozen)).numpy()
  loss = learner.support_losses_fn(episode.support_x, episode.support_y)(frozen).numpy()
  rule = learner.update_rule
  x = np.concatenate([meta_lstm.preprocess(tf.constant(grad)).numpy(),
                      meta_lstm.preprocess(tf.constant(np.broadcast_to(
                          loss[:, None], grad.shape).copy())).numpy()], -1)
  inputs = np.concatenate([x, theta[..., None], np.zeros_like(theta)[..., None]], -1)
  sigmoid = lambda z: 1 / (1 + np.exp(-z))
  f = sigmoid(inputs @ rule.w_f.numpy() + rule.b_f.numpy())
  i = sigmoid(inputs @ rule.w_i.numpy() + rule.b_i.numpy())
  adapted = learner.flatten(learner.adapt(episode.support_x, episode.support_y,
                                          training=False, seed=SEED)).numpy()
  np.testing.assert_allclose(adapted, f * theta - i * grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("gate_feedback", ["logit", "gate"])
def test_direct_gates_equal_the_concatenated_inputs_form_task_by_task(gate_feedback):
  """The gates without a front LSTM are summed term by term (the loss's terms
  once per task); trajectory and meta-gradient equal the einsum over the
  concatenated [x, theta, gate] inputs, run one task at a time."""
  learner = build64(inner_steps=3, gate_feedback=gate_feedback, head_init="glorot")
  common.perturb_variables(learner, seed=4)
  rule = learner.update_rule
  episode = common.make_episode(num_tasks=3)

  def reference_update(theta, grad, loss, state):  # the paper's inputs, concatenated
    _, f_prev, i_prev = state
    x = tf.concat([meta_lstm.preprocess(grad, rule.p), meta_lstm.preprocess(
        tf.broadcast_to(loss[:, tf.newaxis], tf.shape(grad)), rule.p)], -1)
    f_logit = rule._gate(x, theta, f_prev, rule.w_f, rule.b_f)  # pylint: disable=protected-access
    i_logit = rule._gate(x, theta, i_prev, rule.w_i, rule.b_i)  # pylint: disable=protected-access
    f, i = tf.sigmoid(f_logit), tf.sigmoid(i_logit)
    fed_back = (f_logit, i_logit) if gate_feedback == "logit" else (f, i)
    return f * theta - i * grad, ((),) + fed_back

  def loss_and_grads(ep):
    with tf.GradientTape() as tape:
      loss, _ = learner.meta_loss(ep, training=True, seed=SEED)
    return loss, tape.gradient(loss, learner.trainable_variables)

  loss, grads = loss_and_grads(episode)
  batched = learner.trajectory(episode.support_x, episode.support_y)
  direct = type(rule).__call__
  type(rule).__call__ = lambda self, *args: reference_update(*args)
  try:
    for b in range(3):
      task = type(episode)(*[t[b:b + 1] for t in episode])
      for got, want in zip(batched, learner.trajectory(task.support_x, task.support_y)):
        np.testing.assert_allclose(got[b:b + 1].numpy(), want.numpy(), rtol=1e-12, atol=1e-15)
    reference_loss, reference_grads = loss_and_grads(episode)
  finally:
    type(rule).__call__ = direct
  assert np.abs((batched[-1] - batched[0]).numpy()).max() > 1e-3  # the heads moved
  np.testing.assert_allclose(loss.numpy(), reference_loss.numpy(), rtol=1e-12)
  for got, want in zip(grads, reference_grads):
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-10, atol=1e-14)
  assert np.abs(grads[-1].numpy()).max() > 0  # the update rule is trained


def test_initial_gates_follow_the_reference_init():
  learner = build64(inner_lr=0.3)
  rule = learner.update_rule
  assert 4.0 <= rule.b_f.numpy() <= 5.0  # f ~ 0.98-0.99
  np.testing.assert_allclose(1 / (1 + np.exp(-rule.b_i.numpy())), 0.3, rtol=1e-12)
  for w in (rule.w_f, rule.w_i):
    assert w.shape == (6,) and np.abs(w.numpy()).max() <= 0.01


def test_meta_parameters_do_not_depend_on_the_learner_size():
  """Coordinate-wise: one LSTM for every coordinate, whatever the head."""
  for overrides in ({}, {"lstm_units": 5}, {"variant": "l2l", "l2l_units": 4}):
    shapes = [[v.shape for v in build64(hidden_sizes=h, **overrides).update_rule.variables]
              for h in ("", "8", "16,4")]
    assert shapes[0] == shapes[1] == shapes[2], overrides
  assert sum(int(np.prod(v.shape)) for v in build64(variant="l2l", l2l_units=20)
             .update_rule.variables) == (22 + 1) * 80 + (40 + 1) * 80 + 21


# -- the L2L variant ----------------------------------------------------------------

def test_l2l_meta_loss_sums_the_query_loss_over_the_trajectory():
  learner = build64(variant="l2l", inner_steps=3, l2l_units=4, l2l_scale=0.5)
  common.perturb_variables(learner, seed=3)
  episode = common.make_episode()
  loss, metrics = learner.meta_loss(episode, training=True, seed=SEED)
  thetas = learner.trajectory(episode.support_x, episode.support_y)
  assert len(thetas) == 4  # theta_0 .. theta_T
  terms = [np.mean(base.cross_entropy(learner.predict(
      learner.unflatten(t), episode.query_x, training=False, seed=SEED),
      episode.query_y).numpy()) for t in thetas]
  np.testing.assert_allclose(loss.numpy(), np.sum(terms), rtol=1e-12)
  np.testing.assert_allclose(metrics["query_loss"].numpy(), terms[-1], rtol=1e-12)
  assert np.std(terms) > 1e-4  # the optimiser moves theta


def test_l2l_update_is_scale_times_the_linear_output_and_zero_output_is_no_update():
  learner = build64(variant="l2l", inner_steps=2, l2l_units=4, l2l_scale=0.25)
  common.perturb_variables(learner, seed=4)
  rule = learner.update_rule
  episode = common.make_episode()
  theta = learner.flatten(learner.head.tiled(3))
  grad = learner.flatten(learner.support_gradient_fn(
      episode.support_x, episode.support_y)(learner.head.tiled(3)))
  state = rule.initial_state(theta)
  h = meta_lstm.preprocess(grad)
  for layer, layer_state in zip(rule.layers, state):
    h, _ = layer(h, layer_state)
  step = np.einsum("bph,h->bp", h.numpy(), rule.w_out.numpy()) + rule.b_out.numpy()
  first = learner.trajectory(episode.support_x, episode.support_y)[1]
  np.testing.assert_allclose(first.numpy(), theta.numpy() + 0.25 * step, rtol=1e-12,
                             atol=1e-15)
  rule.w_out.assign(tf.zeros_like(rule.w_out))
  rule.b_out.assign(0.0)
  for a, t in zip(learner.adapt(episode.support_x, episode.support_y, training=False,
                                seed=SEED), learner.head.params):
    np.testing.assert_array_equal(a.numpy(), np.broadcast_to(t.numpy(), a.shape))


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("overrides", [{}, {"lstm_units": 4}, {"variant": "l2l"}])
def test_runs_in_tf_function_with_finite_loss_and_gradients(jit_compile, overrides):
  learner = meta_lstm.build(meta_lstm.Config(**dict({"hidden_sizes": "8"}, **overrides)),
                            NUM_WAYS, DIM, "float32")
  common.check_finite_loss_and_gradients_in_tf_function(learner, jit_compile)


# -- the checks every learner passes -------------------------------------------------

@pytest.mark.parametrize("overrides", [{}, {"hidden_sizes": ""}, {"lstm_units": 4}])
def test_adaptation_lowers_the_support_loss(overrides):
  common.check_adaptation_lowers_support_loss(build64(**overrides))


@pytest.mark.parametrize("overrides", [{}, {"variant": "l2l"}])
def test_evaluation_is_deterministic(overrides):
  common.check_evaluation_is_deterministic(build64(**overrides))


@pytest.mark.parametrize("overrides", [{"lstm_units": 4}, {"variant": "l2l"}])
def test_checkpoint_round_trip_restores_identical_predictions(tmp_path, overrides):
  common.check_checkpoint_round_trip(lambda: build64(**overrides), tmp_path)


def test_wrong_shape_raises():
  with pytest.raises(ValueError, match="built for 5-way tasks of dimension 16"):
    build64().adapt(tf.zeros([1, 4, 1, DIM], tf.float64), tf.zeros([1, 4, 1], tf.int32),
                    training=False, seed=SEED)


@pytest.mark.parametrize("overrides, message", [
    ({"variant": "lstm"}, "--meta_lstm_variant='lstm'"),
    ({"inner_lr": 1.0}, "--meta_lstm_inner_lr=1.0"),
    ({"gate_feedback": "post"}, "--meta_lstm_gate_feedback='post'"),
    ({"lstm_units": -1}, "--meta_lstm_lstm_units=-1"),
    ({"l2l_units": 0}, "--meta_lstm_l2l_units=0"),
    ({"preprocess_p": 0.0}, "--meta_lstm_preprocess_p=0.0"),
    ({"hidden_sizes": "8,"}, "--meta_lstm_hidden_sizes='8,'"),
])
def test_bad_config_is_a_user_error(overrides, message):
  with pytest.raises(errors.ConfigError, match=message):
    build64(**overrides)


def test_every_config_field_has_help():
  for name, default, help_text in base.config_fields(meta_lstm.Config):
    assert len(help_text) > 20, name
    assert isinstance(default, (int, float, bool, str)), name


# -- meta-training through the real Trainer (Ravi's outer chain) ----------------------

def test_meta_trained_meta_lstm_reaches_the_class_mean_baseline(tmp_path):
  """Linear head: starts at NCM and stays (measured 99.4% vs NCM 99.2%)."""
  tf.random.set_seed(0)
  learner = meta_lstm.build(meta_lstm.Config(hidden_sizes=""), NUM_WAYS, DIM, "float32")
  accuracy, ncm, _ = common.meta_train_and_score(
      learner, tmp_path, outer=optim.OuterConfig(**meta_lstm.SPEC.outer_defaults))
  assert ncm > 0.5
  assert accuracy >= ncm - 0.03, (accuracy, ncm)


def test_meta_training_the_default_mlp_head_recovers_from_its_random_layer(tmp_path):
  """The default 64-unit ReLU layer is random at first; on these 16-d toy
  features it loses class information (measured 73.6% at init vs NCM 99.2%,
  where synthetic's 640-d features keep it: 78.9% vs NCM 49.9% there after
  300 steps). 60 steps of meta-training recover most of it (measured 91.3%)."""
  tf.random.set_seed(0)
  learner = meta_lstm.build(meta_lstm.Config(), NUM_WAYS, DIM, "float32")
  accuracy, ncm, at_init = common.meta_train_and_score(
      learner, tmp_path, outer=optim.OuterConfig(**meta_lstm.SPEC.outer_defaults))
  assert accuracy >= at_init + 0.1, (accuracy, at_init, ncm)
  assert accuracy >= ncm - 0.12, (accuracy, ncm)
