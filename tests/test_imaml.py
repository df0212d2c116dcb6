"""Tests of the iMAML learner: CG, HVPs, implicit gradients, no inner backprop."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from leo_suite.errors import ConfigError
from leo_suite.data.episodes import Episode
from leo_suite.models import heads, imaml

SEED = tf.constant([3, 7], tf.int32)


# -- helpers ------------------------------------------------------------------

def make_episode(rng, num_tasks=3, num_ways=3, num_shots=2, num_queries=4,
                 dim=6, dtype=np.float64, prototypes=None, noise=1.0):
  """Random episode; with `prototypes` [N, D] classes are noisy prototypes."""
  def draw(count):
    x = rng.standard_normal((num_tasks, num_ways, count, dim)) * noise
    if prototypes is not None:
      x = x + prototypes[np.newaxis, :, np.newaxis, :]
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(dtype)

  def labels(count):
    return np.broadcast_to(np.arange(num_ways, dtype=np.int32)[None, :, None],
                           (num_tasks, num_ways, count)).copy()
  return Episode(tf.constant(draw(num_shots)), tf.constant(labels(num_shots)),
                 tf.constant(draw(num_queries)), tf.constant(labels(num_queries)))


def build(dtype="float64", num_ways=3, dim=6, **overrides):
  return imaml.build(imaml.Config(**overrides), num_ways, dim, dtype)


def flat(tensors, task):
  return np.concatenate([np.asarray(t[task]).ravel() for t in tensors])


def unflat(vector, like):
  """Flat [P] -> list of tensors shaped like `like` (without task axis)."""
  out, offset = [], 0
  for t in like:
    size = int(np.prod(t.shape))
    out.append(tf.reshape(vector[offset:offset + size], t.shape))
    offset += size
  return out


def exact_task_hessians(params, inputs, labels):
  """Per-task Hessians [B, P, P] of the mean CE via the jacobian of the gradient."""
  hessians = []
  for task in range(params[0].shape[0]):
    like = [p[task] for p in params]
    point = tf.constant(flat(params, task))
    with tf.GradientTape(persistent=True) as outer:
      outer.watch(point)
      with tf.GradientTape() as inner:
        inner.watch(point)
        weights = [w[tf.newaxis] for w in unflat(point, like)]
        loss = heads.head_task_losses(weights, inputs[task:task + 1],
                                 labels[task:task + 1])[0]
      grad = inner.gradient(loss, point)
    hessians.append(outer.jacobian(grad, point, experimental_use_pfor=False).numpy())
  return np.stack(hessians)


def random_fast_weights(learner, rng, num_tasks, scale=0.5):
  return [tf.constant(rng.standard_normal((num_tasks,) + tuple(p.shape)) * scale)
          for p in learner.head.params]


# -- conjugate gradient and Hessian-vector products ----------------------------

def test_conjugate_gradient_matches_linalg_solve_per_task():
  rng = np.random.default_rng(0)
  num_tasks, shapes = 3, [(3, 2), (2,)]
  dim = 8
  m = rng.standard_normal((num_tasks, dim, dim))
  a = m @ np.transpose(m, (0, 2, 1)) + 0.5 * np.eye(dim)  # SPD per task
  rhs_flat = rng.standard_normal((num_tasks, dim))

  def split(v):  # [B, 8] -> [[B, 3, 2], [B, 2]]
    return [tf.reshape(v[:, :6], [num_tasks, 3, 2]), v[:, 6:]]

  def join(vs):
    return tf.concat([tf.reshape(vs[0], [num_tasks, 6]), vs[1]], axis=1)

  def apply_a(vs):
    return split(tf.einsum("bij,bj->bi", a, join(vs)))

  expected = tf.linalg.solve(a, rhs_flat[..., None])[..., 0].numpy()
  x, rr = imaml.conjugate_gradient(apply_a, split(tf.constant(rhs_flat)), dim)
  np.testing.assert_allclose(join(x).numpy(), expected, rtol=1e-8, atol=1e-10)
  assert np.all(rr.numpy() < 1e-10)
  # CG minimises the A-norm of the error: it never increases with more steps.
  errors = []
  for steps in range(1, dim + 1):
    x, _ = imaml.conjugate_gradient(apply_a, split(tf.constant(rhs_flat)), steps)
    e = join(x).numpy() - expected
    errors.append(np.einsum("bi,bij,bj->b", e, a, e))
  assert np.all(np.diff(np.array(errors), axis=0) <= 1e-9)
  assert np.all(errors[0] > 1e-3)  # one step is far from the solution


def test_conjugate_gradient_zero_rhs_and_indefinite_are_safe():
  a = tf.constant([[[2.0, 0.0], [0.0, 3.0]], [[-1.0, 0.0], [0.0, -2.0]]], tf.float64)
  rhs = tf.constant([[0.0, 0.0], [1.0, 1.0]], tf.float64)
  x, _ = imaml.conjugate_gradient(
      lambda v: [tf.einsum("bij,bj->bi", a, v[0])], [rhs], 4)
  # Task 0: b = 0 -> x = 0 (no 0/0); task 1: p.Ap < 0 -> keeps x_0 = 0.
  np.testing.assert_array_equal(x[0].numpy(), np.zeros((2, 2)))


@pytest.mark.parametrize("hidden_sizes", ["", "4"])
def test_hessian_vector_product_matches_exact_hessian(hidden_sizes):
  rng = np.random.default_rng(1)
  learner = build(hidden_sizes=hidden_sizes, num_ways=3, dim=3)
  episode = make_episode(rng, num_tasks=2, num_ways=3, num_shots=2, dim=3)
  params = random_fast_weights(learner, rng, 2)
  vector = random_fast_weights(learner, rng, 2, scale=1.0)
  loss_fn = learner.support_losses_fn(episode.support_x, episode.support_y)
  hv = imaml.gradient_and_hvp(loss_fn, params)[1](vector)
  hessians = exact_task_hessians(params, episode.support_x, episode.support_y)
  assert np.abs(hessians).max() > 1e-2  # a non-trivial Hessian
  for task in range(2):
    np.testing.assert_allclose(flat(hv, task), hessians[task] @ flat(vector, task),
                               rtol=1e-9, atol=1e-12)


# -- the implicit meta-gradient on a quadratic inner loss ----------------------

def quadratic_problem(rng, num_tasks=2, dim=5):
  m = rng.standard_normal((num_tasks, dim, dim))
  hessian = m @ np.transpose(m, (0, 2, 1)) + 0.1 * np.eye(dim)
  linear = rng.standard_normal((num_tasks, dim))

  def loss_fn(phi):  # per task: 1/2 phi^T A phi - c^T phi
    (p,) = phi
    return (0.5 * tf.einsum("bi,bij,bj->b", p, hessian, p)
            - tf.einsum("bi,bi->b", linear, p))
  return hessian, linear, loss_fn


def test_quadratic_inner_solve_reaches_proximal_minimiser():
  rng = np.random.default_rng(2)
  hessian, linear, loss_fn = quadratic_problem(rng)
  lam = 2.0
  theta = rng.standard_normal((2, 5))
  step = 1.0 / (np.linalg.eigvalsh(hessian).max() + lam)
  solve = tf.function(lambda t: imaml.inner_solve(
      loss_fn, [t], num_steps=1000, inner_lr=step, lam=lam, variant="paper"))
  phi = solve(tf.constant(theta))[0].numpy()
  # argmin 1/2 phi'A phi - c'phi + lam/2 |phi - theta|^2 = (A + lam I)^-1 (c + lam theta)
  expected = np.linalg.solve(hessian + lam * np.eye(5),
                             (linear + lam * theta)[..., None])[..., 0]
  np.testing.assert_allclose(phi, expected, rtol=1e-8, atol=1e-10)


def test_quadratic_reference_inner_solve_is_sgd_then_one_pull_back():
  rng = np.random.default_rng(3)
  hessian, linear, loss_fn = quadratic_problem(rng)
  lam, lr, steps = 2.0, 0.02, 7
  theta = rng.standard_normal((2, 5))
  phi = theta.copy()
  for _ in range(steps):
    phi = phi - lr * (np.einsum("bij,bj->bi", hessian, phi) - linear)
  phi = phi - lr * lam * (phi - theta)
  got = imaml.inner_solve(loss_fn, [tf.constant(theta)], num_steps=steps,
                          inner_lr=lr, lam=lam, variant="reference")[0].numpy()
  np.testing.assert_allclose(got, phi, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant,lam,damping", [
    ("paper", 2.0, 1.0), ("paper", 0.3, 0.0), ("reference", 2.0, 1.0),
    ("reference", 0.5, 0.25)])
def test_quadratic_implicit_gradient_closed_form(variant, lam, damping):
  rng = np.random.default_rng(4)
  hessian, _, loss_fn = quadratic_problem(rng)
  phi_star = [tf.constant(rng.standard_normal((2, 5)))]
  query_grad = rng.standard_normal((2, 5))
  v, residual = imaml.implicit_meta_gradient(
      loss_fn, phi_star, [tf.constant(query_grad)], lam=lam, cg_steps=5,
      cg_damping=damping, variant=variant)
  if variant == "paper":  # (I + H/lam)^-1 g = lam (H + lam I)^-1 g
    operator = np.eye(5) + hessian / lam
  else:  # imaml_dev: ((1 + cg_damping) I + H/(lam + 10)) v = g
    operator = (1 + damping) * np.eye(5) + hessian / (lam + 10.0)
  expected = np.linalg.solve(operator, query_grad[..., None])[..., 0]
  np.testing.assert_allclose(v[0].numpy(), expected, rtol=1e-7, atol=1e-9)
  assert np.all(residual.numpy() < 1e-6)
  # It is not the first-order gradient.
  assert np.abs(expected - query_grad).max() > 1e-2


def test_first_order_fallback_when_no_cg_steps():
  rng = np.random.default_rng(5)
  _, _, loss_fn = quadratic_problem(rng)
  g = tf.constant(rng.standard_normal((2, 5)))
  phi = [tf.constant(rng.standard_normal((2, 5)))]
  for variant, steps in (("paper", 0), ("reference", 1)):
    v, residual = imaml.implicit_meta_gradient(
        loss_fn, phi, [g], lam=2.0, cg_steps=steps, variant=variant)
    np.testing.assert_array_equal(v[0].numpy(), g.numpy())
    assert residual is None


def test_implicit_gradient_matches_finite_differences_of_converged_inner():
  """Linear head + proximal term: strongly convex, solved to convergence."""
  rng = np.random.default_rng(6)
  num_ways, dim = 3, 4
  # Inner GD contracts by <= 1 - inner_lr * lam = 0.75 per step: 120 steps
  # reach phi* to ~1e-15.
  learner = build(num_ways=num_ways, dim=dim, lam=0.5, inner_lr=0.5,
                  inner_steps=120, cg_steps=15)  # 15 parameters
  episode = make_episode(rng, num_tasks=2, num_ways=num_ways, num_shots=2,
                         num_queries=3, dim=dim)
  for p in learner.head.params:  # away from the symmetric zero-bias init
    p.assign(rng.standard_normal(p.shape))
  _, grads, metrics = learner.loss_and_gradients(episode, seed=SEED)
  # CG stops at r.r < 1e-10 (imaml_dev's absolute tolerance): ~1e-5 relative.
  assert float(metrics["cg_relative_residual"]) < 1e-4

  meta_loss = tf.function(
      lambda: learner.meta_loss(episode, training=True, seed=SEED)[0])
  eps = 1e-5
  numeric = []
  for var in learner.head.params:
    value = var.numpy()
    fd = np.zeros_like(value)
    for index in np.ndindex(value.shape):
      shifted = value.copy()
      shifted[index] += eps
      var.assign(shifted)
      up = float(meta_loss())
      shifted[index] -= 2 * eps
      var.assign(shifted)
      down = float(meta_loss())
      fd[index] = (up - down) / (2 * eps)
    var.assign(value)
    numeric.append(fd)
  numeric_flat = np.concatenate([n.ravel() for n in numeric])
  implicit_flat = np.concatenate([g.numpy().ravel() for g in grads])
  scale = np.abs(numeric_flat).max()
  assert scale > 1e-2
  np.testing.assert_allclose(implicit_flat, numeric_flat, atol=1e-4 * scale)

  # The first-order gradient (cg_steps=0) is measurably further away.
  first_order = build(num_ways=num_ways, dim=dim, lam=0.5, inner_lr=0.5,
                      inner_steps=120, cg_steps=0)
  for src, dst in zip(learner.head.params, first_order.head.params):
    dst.assign(src)
  _, fo_grads, _ = first_order.loss_and_gradients(episode, seed=SEED)
  fo_flat = np.concatenate([g.numpy().ravel() for g in fo_grads])
  implicit_error = np.abs(implicit_flat - numeric_flat).max()
  assert np.abs(fo_flat - numeric_flat).max() > 100 * implicit_error


def test_reference_variant_learner_gradient_uses_reference_operator():
  rng = np.random.default_rng(7)
  learner = build(num_ways=3, dim=3, variant="reference", lam=2.0,
                  cg_damping=1.0, inner_steps=3, inner_lr=0.1, cg_steps=12)
  episode = make_episode(rng, num_tasks=2, num_ways=3, num_shots=2, dim=3)
  for p in learner.head.params:
    p.assign(rng.standard_normal(p.shape))
  phi = learner.adapt(episode.support_x, episode.support_y, training=True, seed=SEED)
  with tf.GradientTape() as tape:
    tape.watch(phi)
    total = tf.reduce_sum(heads.head_task_losses(phi, episode.query_x, episode.query_y))
  query_grads = tape.gradient(total, phi)
  hessians = exact_task_hessians(phi, episode.support_x, episode.support_y)
  expected = np.mean([np.linalg.solve(2.0 * np.eye(12) + hessians[b] / 12.0,
                                      flat(query_grads, b)) for b in range(2)], 0)
  _, grads, _ = learner.loss_and_gradients(episode, seed=SEED)
  got = np.concatenate([g.numpy().ravel() for g in grads])
  # CG's absolute stop r.r < 1e-10 bounds the agreement (~1e-5 relative).
  np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max())
  first_order = np.mean([flat(query_grads, b) for b in range(2)], 0)
  assert np.abs(first_order / 2.0 - expected).max() > 1e-2 * np.abs(expected).max()


def test_reference_pull_back_step_on_learner():
  rng = np.random.default_rng(8)
  lr, lam = 0.1, 2.0
  episode = make_episode(rng, num_tasks=2)
  learner = build(variant="reference", inner_steps=1, inner_lr=lr, lam=lam)
  theta = learner.head.tiled(2)
  with tf.GradientTape() as tape:
    tape.watch(theta)
    total = tf.reduce_sum(heads.head_task_losses(theta, episode.support_x,
                                            episode.support_y))
  grads = tape.gradient(total, theta)
  phi = learner.adapt(episode.support_x, episode.support_y, training=True, seed=SEED)
  # phi_1 = theta - lr g;  pull back: phi_1 - lr lam (phi_1 - theta) = theta - lr g (1 - lr lam)
  for p, t, g in zip(phi, theta, grads):
    np.testing.assert_allclose(p.numpy(), (t - lr * (1 - lr * lam) * g).numpy(),
                               rtol=1e-12, atol=1e-14)


# -- no backpropagation through the inner loop --------------------------------

def test_no_tape_records_the_inner_steps():
  rng = np.random.default_rng(9)
  learner = build(inner_steps=5)
  episode = make_episode(rng)
  with tf.GradientTape(persistent=True) as tape:
    phi = learner.adapt(episode.support_x, episode.support_y, training=True,
                        seed=SEED)
    loss, grads, _ = learner.loss_and_gradients(episode, seed=SEED)
  variables = learner.trainable_variables
  assert all(g is None for g in tape.gradient(phi, variables))
  assert all(g is None for g in tape.gradient(loss, variables))
  # ...yet the implicit meta-gradient reaches every variable.
  assert all(np.abs(g.numpy()).max() > 0 for g in grads)


def _graph_size(inner_steps, variant):
  learner = build(inner_steps=inner_steps, variant=variant, cg_steps=2)
  episode = make_episode(np.random.default_rng(10))
  fn = tf.function(lambda e, s: learner.loss_and_gradients(e, seed=s))
  graph = fn.get_concrete_function(episode, SEED).graph
  ops = graph.get_operations()
  return len(ops), sum(op.type in ("While", "StatelessWhile") for op in ops)


@pytest.mark.parametrize("variant", imaml.VARIANTS)
def test_graph_does_not_grow_with_inner_steps(variant):
  size_1, loops_1 = _graph_size(1, variant)
  size_20, loops_20 = _graph_size(20, variant)
  assert size_1 == size_20
  assert loops_1 == loops_20 == 1  # the inner steps are one while loop


# Runs in a fresh interpreter: the CPU allocator keeps statistics only when
# TF_CPU_ALLOCATOR_USE_BFC is set before TensorFlow starts.
_MEMORY_SCRIPT = """
import json, sys
import numpy as np, tensorflow as tf
tf.config.threading.set_inter_op_parallelism_threads(1)  # steadier peaks
from leo_suite.data.episodes import Episode
from leo_suite.models import imaml

def peak_memory_bytes(inner_steps, num_tasks):
  rng = np.random.default_rng(0)
  def x(count):
    a = rng.standard_normal((num_tasks, 5, count, 64)).astype(np.float32)
    return tf.constant(a / np.linalg.norm(a, axis=-1, keepdims=True))
  def y(count):
    return tf.constant(np.broadcast_to(np.arange(5, dtype=np.int32)[None, :, None],
                                       (num_tasks, 5, count)).copy())
  episode = Episode(x(1), y(1), x(5), y(5))
  learner = imaml.build(imaml.Config(inner_steps=inner_steps, hidden_sizes="256"),
                        5, 64, "float32")
  @tf.function
  def step(episode, seed):  # one meta-gradient step, as the trainer runs it
    loss, grads, _ = learner.loss_and_gradients(episode, seed=seed)
    return loss, grads
  seed = tf.constant([1, 2])
  tf.nest.map_structure(lambda t: t.numpy(), step(episode, seed))  # trace
  before = tf.config.experimental.get_memory_info("CPU:0")["current"]
  tf.config.experimental.reset_memory_stats("CPU:0")
  tf.nest.map_structure(lambda t: t.numpy(), step(episode, seed))
  return tf.config.experimental.get_memory_info("CPU:0")["peak"] - before

print(json.dumps({"steps": [peak_memory_bytes(n, 8) for n in (1, 40)],
                  "tasks16": peak_memory_bytes(1, 16)}))
"""


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_inner_steps():
  env = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC="true", TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  run = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], env=env,
                       capture_output=True, text=True, timeout=600, check=True)
  result = json.loads(run.stdout.strip().splitlines()[-1])
  peak_1, peak_40 = result["steps"]
  # The measurement sees the step's tensors: doubling the tasks doubles it...
  assert result["tasks16"] > 1.6 * peak_1
  # ...but 40 inner steps need no more than 1. The allowance covers allocator
  # jitter (+-0.3 MB seen between step counts). Checked to fail when the
  # gradient is instead taken by backprop through the inner while loop (the
  # base Learner's loss_and_gradients without stop_gradient): 3.0 MB at 1
  # step, 6.6 MB at 40.
  assert peak_40 < 1.2 * peak_1


# -- the common learner checks -------------------------------------------------

@pytest.mark.parametrize("variant", imaml.VARIANTS)
@pytest.mark.parametrize("hidden_sizes", ["", "8"])
def test_adaptation_lowers_support_loss(variant, hidden_sizes):
  rng = np.random.default_rng(11)
  learner = build(variant=variant, hidden_sizes=hidden_sizes)
  episode = make_episode(rng)
  before = heads.head_task_losses(learner.head.tiled(3), episode.support_x,
                             episode.support_y).numpy()
  phi = learner.adapt(episode.support_x, episode.support_y, training=True, seed=SEED)
  after = heads.head_task_losses(phi, episode.support_x, episode.support_y).numpy()
  assert np.all(after < before - 1e-3)


def test_tasks_are_adapted_independently():
  rng = np.random.default_rng(12)
  learner = build()
  episode = make_episode(rng, num_tasks=3)
  both = learner.adapt(episode.support_x, episode.support_y, training=False, seed=SEED)
  alone = learner.adapt(episode.support_x[1:2], episode.support_y[1:2],
                        training=False, seed=SEED)
  for b, a in zip(both, alone):
    np.testing.assert_allclose(b.numpy()[1:2], a.numpy(), rtol=1e-12)
  assert np.abs(both[0].numpy()[0] - both[0].numpy()[1]).max() > 1e-4


def test_evaluation_is_deterministic():
  rng = np.random.default_rng(13)
  learner = build(dtype="float32", hidden_sizes="8")
  episode = make_episode(rng, dtype=np.float32)
  outputs = []
  for seed in ([1, 2], [5, 9]):
    seed = tf.constant(seed)
    state = learner.adapt(episode.support_x, episode.support_y, training=False,
                          seed=seed)
    outputs.append(learner.predict(state, episode.query_x, training=False,
                                   seed=seed).numpy())
  np.testing.assert_array_equal(outputs[0], outputs[1])
  assert outputs[0].shape == (3, 3, 4, 3)


def test_checkpoint_round_trip_restores_predictions(tmp_path):
  rng = np.random.default_rng(14)
  episode = make_episode(rng)
  learner = build(hidden_sizes="5")
  for p in learner.head.params:
    p.assign(rng.standard_normal(p.shape))

  def predictions(model):
    state = model.adapt(episode.support_x, episode.support_y, training=False, seed=SEED)
    return model.predict(state, episode.query_x, training=False, seed=SEED).numpy()
  expected = predictions(learner)
  path = tf.train.Checkpoint(learner=learner).save(str(tmp_path / "ckpt"))
  restored = build(hidden_sizes="5")
  assert np.abs(predictions(restored) - expected).max() > 1e-3
  tf.train.Checkpoint(learner=restored).restore(path).assert_consumed()
  np.testing.assert_array_equal(predictions(restored), expected)


@pytest.mark.parametrize("variant", imaml.VARIANTS)
def test_loss_and_gradients_finite_and_same_in_tf_function(variant):
  rng = np.random.default_rng(15)
  learner = build(dtype="float32", num_ways=5, dim=32, variant=variant,
                  hidden_sizes="16", inner_steps=4, cg_steps=3)
  episode = make_episode(rng, num_tasks=4, num_ways=5, num_shots=1,
                         num_queries=15, dim=32, dtype=np.float32)
  loss, grads, metrics = learner.loss_and_gradients(episode, seed=SEED)
  assert len(grads) == len(learner.trainable_variables)
  for g, v in zip(grads, learner.trainable_variables):
    assert g.shape == v.shape and g.dtype == v.dtype
    assert np.all(np.isfinite(g.numpy()))
  assert np.isfinite(float(loss))
  assert all(np.isfinite(float(m)) for m in metrics.values())
  traced = tf.function(lambda e, s: learner.loss_and_gradients(e, seed=s))
  loss_t, grads_t, _ = traced(episode, SEED)
  np.testing.assert_allclose(float(loss_t), float(loss), rtol=1e-5)
  for a, b in zip(grads_t, grads):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6)
  # adapt/predict trace with static shapes (as evaluation and export need).
  predict = tf.function(lambda sx, sy, qx: learner.predict(
      learner.adapt(sx, sy, training=False, seed=SEED), qx, training=False,
      seed=SEED))
  logits = predict(episode.support_x, episode.support_y, episode.query_x)
  assert logits.shape == (4, 5, 15, 5)
  # ...and with an unknown number of tasks (as an exported signature sees).
  concrete = predict.get_concrete_function(
      tf.TensorSpec([None, 5, 1, 32], tf.float32),
      tf.TensorSpec([None, 5, 1], tf.int32), tf.TensorSpec([None, 5, 15, 32], tf.float32))
  np.testing.assert_allclose(
      concrete(episode.support_x[:2], episode.support_y[:2], episode.query_x[:2]).numpy(),
      logits.numpy()[:2], rtol=1e-5, atol=1e-6)


def test_meta_training_lowers_held_out_query_loss():
  """Tasks share class prototypes: meta-learning theta must help new tasks."""
  rng = np.random.default_rng(16)
  num_ways, dim = 3, 8
  prototypes = rng.standard_normal((num_ways, dim)) * 1.5
  learner = build(dtype="float32", num_ways=num_ways, dim=dim, inner_steps=5)
  held_out = make_episode(rng, num_tasks=16, num_ways=num_ways, num_shots=1,
                          num_queries=5, dim=dim, dtype=np.float32,
                          prototypes=prototypes)
  optimizer = tf.keras.optimizers.Adam(0.05)

  @tf.function
  def train_step(episode):
    loss, grads, _ = learner.loss_and_gradients(episode, seed=SEED)
    optimizer.apply_gradients(zip(grads, learner.trainable_variables))
    return loss

  def held_out_loss():
    return float(learner.meta_loss(held_out, training=False, seed=SEED)[0])
  before = held_out_loss()
  for _ in range(60):
    train_step(make_episode(rng, num_tasks=8, num_ways=num_ways, num_shots=1,
                            num_queries=5, dim=dim, dtype=np.float32,
                            prototypes=prototypes))
  assert held_out_loss() < 0.7 * before


def _trained_accuracy(tmp_path, **overrides):
  from tests import test_maml
  learner = imaml.build(imaml.Config(**overrides), test_maml.NUM_WAYS,
                        test_maml.DIM, "float32")
  return test_maml.meta_train_and_score(learner, tmp_path)


def test_meta_trained_imaml_matches_the_class_mean_baseline(tmp_path):
  """Regression: iMAML meta-trained by the real Trainer (LEO's sampler with
  random class-to-slot order, clipping 0.1/0.1) was at chance on Omniglot."""
  accuracy, ncm, at_init = _trained_accuracy(tmp_path)
  assert ncm > 0.5  # learnable; chance is 0.2
  assert at_init >= ncm - 0.03 and accuracy >= ncm - 0.03, (at_init, accuracy, ncm)


@pytest.mark.parametrize("head_init,expect_init_at_chance", [
    ("glorot", True), ("zeros", False)])
def test_old_defaults_fail_the_regression_problem(tmp_path, head_init,
                                                  expect_init_at_chance):
  """The root cause, pinned: with the paper's lam = 2 (inner_lr 0.1) the
  adaptation phi* - theta = -grad L_S(phi*)/lam is tiny on unit-norm
  embeddings, so random Glorot slot logits swamp it (chance from the start),
  and from a zero head Adam's slot-asymmetric noise on theta outgrows it."""
  accuracy, ncm, at_init = _trained_accuracy(tmp_path, lam=2.0, inner_lr=0.1,
                                             head_init=head_init)
  assert (at_init < 0.4) == expect_init_at_chance, at_init
  assert accuracy < ncm - 0.2, (accuracy, ncm)


# -- configuration --------------------------------------------------------------

def test_config_fields_have_help_and_flag_types():
  for field in dataclasses.fields(imaml.Config):
    assert field.metadata.get("help")
    assert type(field.default) in (int, float, bool, str)
  assert imaml.SPEC.flag_prefix == "imaml_"
  defaults = imaml.Config()
  assert (defaults.lam, defaults.cg_steps, defaults.variant) == (0.2, 5, "paper")
  assert (defaults.inner_lr, defaults.head_init) == (1.0, "zeros")


@pytest.mark.parametrize("overrides,flag", [
    (dict(variant="hf"), "imaml_variant"), (dict(lam=0.0), "imaml_lam"),
    (dict(hidden_sizes="64,x"), "imaml_hidden_sizes"),
    (dict(inner_steps=-1), "imaml_inner_steps"), (dict(cg_steps=-2), "imaml_cg_steps"),
    (dict(head_init="ones"), "imaml_head_init"),
    (dict(lam=5.0), "imaml_inner_lr=1.0: with --imaml_lam=5.0 the proximal term alone diverges"),
    (dict(lam=0.5, inner_lr=4.0), "use inner_lr < 4 ")])
def test_bad_config_is_a_clear_config_error(overrides, flag):
  with pytest.raises(ConfigError, match=flag):
    build(**overrides)


def test_stable_proximal_steps_build():
  build(lam=5.0, inner_lr=0.39)              # alpha * lam = 1.95 < 2
  build(lam=5.0, variant="reference")        # its pull-back is one step, not iterated


def test_wrong_episode_shape_raises():
  learner = build(num_ways=3, dim=6)
  episode = make_episode(np.random.default_rng(17), dim=5)
  with pytest.raises(ValueError, match="built for 3-way"):
    learner.adapt(episode.support_x, episode.support_y, training=False, seed=SEED)
