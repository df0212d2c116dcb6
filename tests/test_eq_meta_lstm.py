"""Meta-LSTM (Ravi & Larochelle 2017, eq. 2-4) against a numpy transcription
of the paper: several steps of the gated recurrence with non-zero gate
weights, each gate fed its OWN previous value (pre-sigmoid or gate), and the
meta-gradient by central differences through the whole adaptation with the
gradient and loss inputs held constant (the paper's stop_gradient) — which
pins the paths through f_t, i_t, the gates' theta input and the feedback."""

import numpy as np
import pytest
import tensorflow as tf

from leo_suite.models import meta_lstm
from tests import test_maml as common

NUM_WAYS, DIM, SEED = common.NUM_WAYS, common.DIM, common.SEED
STEPS, P_PREPROCESS = 3, 10.0


def sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def preprocess(x, p=P_PREPROCESS):
  big = np.abs(x) >= np.exp(-p)
  safe = np.where(big, np.abs(x), 1.0)
  return np.stack([np.where(big, np.log(safe) / p, -1.0),
                   np.where(big, np.sign(x), np.exp(p) * x)], -1)


def softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def linear_head(theta):
  """theta [B, P] -> W [B, D, N], b [B, N] (row-major, as the learner flattens)."""
  num_tasks = theta.shape[0]
  return (theta[:, :DIM * NUM_WAYS].reshape(num_tasks, DIM, NUM_WAYS),
          theta[:, DIM * NUM_WAYS:])


def mean_ce_and_gradient(theta, x, y):
  """Each task's mean cross-entropy [B] and its gradient [B, P] (a linear head)."""
  w, b = linear_head(theta)
  x = x.reshape(x.shape[0], -1, DIM)
  labels = np.eye(NUM_WAYS)[y.reshape(y.shape[0], -1)]
  probs = softmax(np.einsum("bmd,bdn->bmn", x, w) + b[:, None])
  loss = -np.mean(np.sum(labels * np.log(probs), -1), axis=1)
  delta = (probs - labels) / x.shape[1]
  grad_w = np.einsum("bmd,bmn->bdn", x, delta)
  return loss, np.concatenate([grad_w.reshape(theta.shape[0], -1), delta.sum(1)], 1)


def trajectory(theta0, gates, episode, feedback, inputs=None):
  """theta_T by the paper's cell; `inputs` [(grad_t, L_t)] held constant if given.
  gates: (w_f [6], w_i [6], b_f, b_i). Returns (theta_T, the inputs used)."""
  w_f, w_i, b_f, b_i = gates
  theta, f_prev, i_prev, used = theta0, np.zeros_like(theta0), np.zeros_like(theta0), []
  for t in range(STEPS):
    if inputs is None:
      loss, grad = mean_ce_and_gradient(theta, episode.support_x.numpy(),
                                        episode.support_y.numpy())
    else:
      grad, loss = inputs[t]
    used.append((grad, loss))
    x = np.concatenate([preprocess(grad), preprocess(np.broadcast_to(loss[:, None], grad.shape))],
                       -1)                                              # [B, P, 4]
    f_logit = np.concatenate([x, theta[..., None], f_prev[..., None]], -1) @ w_f + b_f
    i_logit = np.concatenate([x, theta[..., None], i_prev[..., None]], -1) @ w_i + b_i
    f, i = sigmoid(f_logit), sigmoid(i_logit)
    theta = f * theta - i * grad                                        # c_t = theta_t
    f_prev, i_prev = (f_logit, i_logit) if feedback == "logit" else (f, i)
  return theta, used


def query_loss(theta, episode):
  loss, _ = mean_ce_and_gradient(theta, episode.query_x.numpy(), episode.query_y.numpy())
  return loss.mean()


def build(feedback):
  learner = meta_lstm.build(meta_lstm.Config(hidden_sizes="", inner_steps=STEPS,
                                             gate_feedback=feedback),
                            NUM_WAYS, DIM, "float64")
  rng = np.random.default_rng(7)
  rule = learner.update_rule
  # Gates far from saturation that read every input, the two gates unlike
  # each other (so swapping their feedback shows).
  rule.w_f.assign(rng.normal(size=6) * 0.6)
  rule.w_i.assign(rng.normal(size=6) * 0.6)
  rule.b_f.assign(1.0)
  rule.b_i.assign(-0.5)
  for p in learner.head.params:
    p.assign(0.3 * rng.normal(size=p.shape))
  return learner


def gates_of(learner):
  rule = learner.update_rule
  return tuple(v.numpy() for v in (rule.w_f, rule.w_i, rule.b_f, rule.b_i))


@pytest.mark.parametrize("feedback", ["logit", "gate"])
def test_several_gated_steps_equal_the_papers_recurrence(feedback):
  learner = build(feedback)
  episode = common.make_episode(num_tasks=2)
  theta0 = learner.flatten(learner.head.tiled(2)).numpy()
  expected, _ = trajectory(theta0, gates_of(learner), episode, feedback)
  adapted = learner.flatten(learner.adapt(episode.support_x, episode.support_y,
                                          training=True, seed=SEED)).numpy()
  np.testing.assert_allclose(adapted, expected, rtol=1e-11, atol=1e-13)
  # The feedback matters here: without it the result differs.
  rule = learner.update_rule
  cut = gates_of(learner)
  cut = (np.concatenate([cut[0][:5], [0.0]]), np.concatenate([cut[1][:5], [0.0]])) + cut[2:]
  assert np.abs(trajectory(theta0, cut, episode, feedback)[0] - expected).max() > 1e-4
  assert rule.w_f.numpy()[5] != rule.w_i.numpy()[5]


def central_difference(fn, x, eps=1e-6):
  grad = np.zeros_like(x)
  for index in range(x.size):
    step = np.zeros_like(x)
    step.flat[index] = eps
    grad.flat[index] = (fn(x + step) - fn(x - step)) / (2 * eps)
  return grad


@pytest.mark.parametrize("feedback", ["logit", "gate"])
def test_meta_gradient_is_the_derivative_through_every_gated_step(feedback):
  """d L_query(theta_T) / d (w_f, w_i, b_f, b_i, theta_0) with grad_t, L_t held
  at their values (the paper ignores their second derivatives)."""
  learner = build(feedback)
  episode = common.make_episode(num_tasks=2)
  _, grads, _ = learner.loss_and_gradients(episode, seed=SEED)
  by_var = {v.ref(): g.numpy() for v, g in zip(learner.trainable_variables, grads)}
  gates = gates_of(learner)
  theta0 = learner.head.tiled(1)
  theta0 = learner.flatten(theta0).numpy()[0]
  thetas = np.stack([theta0, theta0])
  _, inputs = trajectory(thetas, gates, episode, feedback)

  def loss_at(theta_row, gate_values):
    theta_t, _ = trajectory(np.stack([theta_row, theta_row]), gate_values, episode, feedback,
                            inputs)
    return query_loss(theta_t, episode)

  rule = learner.update_rule
  for index, var in enumerate((rule.w_f, rule.w_i, rule.b_f, rule.b_i)):
    def along(value, index=index):
      changed = list(gates)
      changed[index] = value
      return loss_at(theta0, tuple(changed))
    np.testing.assert_allclose(by_var[var.ref()], central_difference(along, np.asarray(gates[index], float)),
                               rtol=1e-6, atol=1e-9, err_msg=var.name)
  head_grad = central_difference(lambda row: loss_at(row, gates), theta0)
  w, b = learner.head.params
  np.testing.assert_allclose(by_var[w.ref()].reshape(-1), head_grad[:DIM * NUM_WAYS],
                             rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(by_var[b.ref()], head_grad[DIM * NUM_WAYS:], rtol=1e-6, atol=1e-9)
