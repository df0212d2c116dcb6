"""Reptile: the inner loop and the Reptile "gradient" on quadratics (closed
forms, float64), batched vs task by task, one trainer step is exactly
theta + epsilon * mean(W - theta), mini-batches, the runner's demo preset,
and the checks every learner must pass (tests/test_maml.py)."""

import itertools
import json
import os
import sys

import numpy as np
import pytest
import tensorflow as tf

from leo_suite import errors
from leo_suite.models import base
from leo_suite.models import heads
from leo_suite.models import maml
from leo_suite.models import reptile
from leo_suite.training import optim
from leo_suite.training import layout
from leo_suite.training import settings as settings_lib
from leo_suite.training import trainer as trainer_lib
from tests import test_maml as common

from tests import scripts_run

NUM_WAYS, DIM, SEED = common.NUM_WAYS, common.DIM, common.SEED
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build64(**overrides):
  overrides.setdefault("hidden_sizes", "8")  # small MLP head: fast, still nonlinear
  return reptile.build(reptile.Config(**overrides), NUM_WAYS, DIM, "float64")


# -- quadratics: L_b(x) = 1/2 (x - a_b)^T A_b (x - a_b), one per task ------------

def quadratic_tasks(num_tasks=3, dim=4, seed=0):
  rng = np.random.default_rng(seed)
  roots = rng.normal(size=(num_tasks, dim, dim))
  curvatures = np.einsum("bij,bkj->bik", roots, roots) / dim + 0.1 * np.eye(dim)
  centres = rng.normal(size=(num_tasks, dim))
  return curvatures, centres, rng.normal(size=dim)


def quadratic_gradient_fn(curvatures, centres):
  """(params [x [B, dim]], step) -> [A_b (x_b - a_b)]."""
  a, c = tf.constant(curvatures), tf.constant(centres)
  return lambda params, step: [tf.einsum("bij,bj->bi", a, params[0] - c)]


@pytest.mark.parametrize("steps", [1, 3])
def test_sgd_inner_loop_and_reptile_gradient_match_the_quadratic_closed_form(steps):
  """Nichol et al. Sec. 5: one SGD step W = theta - alpha A (theta - a), so
  the Reptile gradient is alpha A (theta - a); k steps contract theta - a by
  (I - alpha A)^k."""
  curvatures, centres, theta = quadratic_tasks()
  alpha = 0.3
  adapted = reptile.inner_loop(quadratic_gradient_fn(curvatures, centres),
                               [np.tile(theta, [3, 1])], steps=steps, learning_rate=alpha)
  contraction = [np.linalg.matrix_power(np.eye(4) - alpha * a, steps) for a in curvatures]
  expected = np.stack([c + m @ (theta - c) for c, m in zip(centres, contraction)])
  np.testing.assert_allclose(adapted[0].numpy(), expected, rtol=1e-12)
  gradient = reptile.reptile_gradient([tf.constant(np.tile(theta, [3, 1]))], adapted)[0].numpy()
  np.testing.assert_allclose(gradient, np.mean(theta - expected, axis=0), rtol=1e-12)
  if steps == 1:
    closed_form = alpha * np.einsum("bij,bj->bi", curvatures, theta - centres).mean(0)
    np.testing.assert_allclose(gradient, closed_form, rtol=1e-12)


def test_adam_inner_steps_follow_tf1_adam_per_task():
  """From zero moments, per task and element: TF1 Adam's bias-corrected step."""
  curvatures, centres, theta = quadratic_tasks(seed=1)
  lr, beta1, beta2 = 0.05, 0.5, 0.9
  adapted = reptile.inner_loop(quadratic_gradient_fn(curvatures, centres),
                               [np.tile(theta, [3, 1])], steps=2, learning_rate=lr,
                               optimizer="adam", beta1=beta1, beta2=beta2)[0].numpy()
  x, m, v = np.tile(theta, [3, 1]), 0.0, 0.0
  for t in (1, 2):
    g = np.einsum("bij,bj->bi", curvatures, x - centres)
    m, v = beta1 * m + (1 - beta1) * g, beta2 * v + (1 - beta2) * g * g
    x = x - lr * np.sqrt(1 - beta2 ** t) / (1 - beta1 ** t) * m / (np.sqrt(v) + 1e-8)
  np.testing.assert_allclose(adapted, x, rtol=1e-12)
  # The reference's beta1 = 0: the first step is ~ lr * sign(g), per element.
  first = reptile.inner_loop(quadratic_gradient_fn(curvatures, centres),
                             [np.tile(theta, [3, 1])], steps=1, learning_rate=lr,
                             optimizer="adam")[0].numpy()
  g = np.einsum("bij,bj->bi", curvatures, theta - centres)
  np.testing.assert_allclose(theta - first, lr * np.sign(g), rtol=1e-5)


def test_inner_loop_rejects_an_unknown_optimizer():
  with pytest.raises(ValueError, match="unknown inner optimizer 'rmsprop'"):
    reptile.inner_loop(lambda p, s: p, [tf.zeros([1, 2])], steps=1, learning_rate=0.1,
                       optimizer="rmsprop")


# -- the learner -----------------------------------------------------------------

def test_sgd_adaptation_is_the_maml_inner_loop_with_each_modes_step_count():
  learner = build64(inner_steps=2, eval_inner_steps=5, inner_lr=0.7)
  common.perturb_variables(learner, seed=0)
  episode = common.make_episode()
  loss_fn = learner.support_loss_fn(episode.support_x, episode.support_y)
  theta = learner.head.tiled(3)
  for training, steps in ((True, 2), (False, 5)):
    expected = maml.inner_loop(loss_fn, theta, 0.7, steps)  # autodiff gradients
    adapted = learner.adapt(episode.support_x, episode.support_y, training=training,
                            seed=SEED)
    for e, a in zip(expected, adapted):
      np.testing.assert_allclose(a.numpy(), e.numpy(), rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("train_on_query", [True, False])
def test_batched_reptile_gradient_equals_task_by_task(train_on_query):
  learner = build64(inner_steps=3, train_on_query=train_on_query)
  common.perturb_variables(learner, seed=1)
  episode = common.make_episode(num_tasks=3)
  loss, grads, metrics = learner.loss_and_gradients(episode, seed=SEED)
  per_task = []
  for b in range(3):
    x, y = episode.support_x[b:b + 1], episode.support_y[b:b + 1]
    if train_on_query:  # the inner loop fits the support and query examples
      x = tf.concat([x, episode.query_x[b:b + 1]], axis=2)
      y = tf.concat([y, episode.query_y[b:b + 1]], axis=2)
    adapted = learner.adapt(x, y, training=True, seed=SEED)
    per_task.append([(p - w[0]).numpy() for p, w in zip(learner.head.params, adapted)])
  assert len(grads) == len(learner.trainable_variables) == 4
  for i, g in enumerate(grads):
    np.testing.assert_allclose(g.numpy(), np.mean([t[i] for t in per_task], axis=0),
                               rtol=1e-11, atol=1e-14)
  assert np.isfinite(loss.numpy()) and 0 <= metrics["accuracy"].numpy() <= 1
  # The adapted heads fit what they were trained on better than theta.
  x, y = episode.support_x, episode.support_y
  if train_on_query:
    x = tf.concat([x, episode.query_x], axis=2)
    y = tf.concat([y, episode.query_y], axis=2)
  at_theta = tf.reduce_mean(learner.support_losses_fn(x, y)(learner.head.tiled(3)))
  assert metrics["support_loss"].numpy() < at_theta.numpy() - 0.05


def test_one_trainer_step_with_sgd_at_epsilon_is_exactly_reptiles_update(tmp_path):
  epsilon = 0.37
  learner = build64(inner_steps=2)
  common.perturb_variables(learner, seed=2)
  episode = common.make_episode(num_tasks=4)
  theta = [p.numpy() for p in learner.head.params]
  adapted = learner.adapt(tf.concat([episode.support_x, episode.query_x], 2),
                          tf.concat([episode.support_y, episode.query_y], 2),
                          training=True, seed=SEED)
  outer = optim.OuterConfig(**dict(reptile.SPEC.outer_defaults, learning_rate=epsilon))
  trainer = trainer_lib.Trainer(learner, trainer_lib.TrainConfig(
      checkpoint_path=str(tmp_path), metatrain_batch_size=4, outer=outer), None)
  trainer.train_step(episode, 0)
  for before, w, after in zip(theta, adapted, learner.head.params):
    mean_w = w.numpy().mean(axis=0)
    np.testing.assert_allclose(after.numpy(), before + epsilon * (mean_w - before),
                               rtol=1e-14, atol=1e-15)
    assert np.abs(mean_w - before).max() > 1e-3  # the step really moved theta


def test_outer_defaults_are_plain_sgd_and_the_demo_preset_keeps_epsilon(tmp_path):
  defaults = settings_lib.outer_defaults("reptile")
  assert defaults["outer_optimizer"] == "sgd" and defaults["outer_lr"] == 1.0
  assert defaults["gradient_threshold"] == 0 and defaults["gradient_norm_threshold"] == 0
  chain = optim.build_chain(optim.OuterConfig(**reptile.SPEC.outer_defaults))
  grads = [tf.constant([3.0, -40.0])]
  updates, _ = chain.update(grads, chain.init(grads), grads, loss=tf.constant(1.0))
  np.testing.assert_array_equal(updates[0].numpy(), [-3.0, 40.0])  # -epsilon g, unclipped
  # The runner: --preset=demo's outer_lr (an Adam rate) leaves epsilon alone.
  run_dir = tmp_path / "run"
  proc = scripts_run.run(
      [sys.executable, "runner.py", "--model=reptile", "--preset=demo",
       f"--checkpoint_path={run_dir}", "--num_steps_limit=1", "--checkpoint_steps=1",
       "--reptile_eval_inner_steps=1", f"--data_path={tmp_path / 'data'}"],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES=""))
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(run_dir / layout.CONFIG_FILE) as handle:
    text = handle.read()
  assert '"outer_lr": 1.0' in text and '"outer_optimizer": "sgd"' in text, text[:2000]
  assert '"num_steps_limit"' in text and json.loads(text)


def test_minibatch_gradients_use_distinct_examples_of_each_task():
  learner = build64()
  episode = common.make_episode(num_tasks=2, num_shots=1)  # M = 5 per task
  x, y = episode.support_x, episode.support_y
  gradient_fn = reptile.minibatch_gradient_fn(x, y, 2, SEED)
  params = learner.head.tiled(2)
  drawn = [g.numpy() for g in gradient_fn(params, tf.constant(0))]
  flat_x, flat_y = x.numpy().reshape(2, -1, DIM), y.numpy().reshape(2, -1)
  for b in range(2):
    matches = []
    for subset in itertools.combinations(range(5), 2):
      idx = list(subset)
      expected = heads.head_cross_entropy_gradients(
          [p[b:b + 1] for p in params], flat_x[b:b + 1, idx], flat_y[b:b + 1, idx])
      if all(np.allclose(d[b], e[0].numpy(), rtol=1e-12, atol=1e-15)
             for d, e in zip(drawn, expected)):
        matches.append(subset)
    assert len(matches) == 1, matches  # two distinct examples of task b
  # Deterministic in (seed, step); another step draws another batch.
  again = gradient_fn(params, tf.constant(0))
  for d, a in zip(drawn, again):
    np.testing.assert_array_equal(d, a.numpy())
  assert any(not np.allclose(d, o.numpy()) for step in range(1, 6)
             for d, o in zip(drawn, gradient_fn(params, tf.constant(step))))
  # A batch at least as large as the task is the full-batch gradient.
  full = heads.head_cross_entropy_gradients(params, x, y)
  for f, g in zip(full, reptile.minibatch_gradient_fn(x, y, 5, SEED)(params, tf.constant(3))):
    np.testing.assert_allclose(g.numpy(), f.numpy(), rtol=1e-12, atol=1e-15)


def test_minibatches_only_in_meta_training():
  tf.random.set_seed(4)
  learner = build64(inner_batch_size=3, inner_steps=2, eval_inner_steps=2)
  tf.random.set_seed(4)
  full = build64(inner_steps=2, eval_inner_steps=2)
  episode = common.make_episode(num_shots=2)
  def adapted(l, training, seed):
    return l.adapt(episode.support_x, episode.support_y, training=training,
                   seed=tf.constant(seed))
  for a, b in zip(adapted(learner, False, [1, 2]), adapted(full, False, [5, 6])):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  train_a, train_b = adapted(learner, True, [1, 2]), adapted(learner, True, [1, 3])
  assert max(np.abs((a - b).numpy()).max() for a, b in zip(train_a, train_b)) > 1e-6


# -- the checks every learner passes -------------------------------------------------

@pytest.mark.parametrize("overrides", [{}, {"hidden_sizes": ""},
                                       {"inner_optimizer": "adam", "inner_lr": 0.05}])
def test_adaptation_lowers_the_support_loss(overrides):
  common.check_adaptation_lowers_support_loss(build64(**overrides))


def test_evaluation_is_deterministic():
  common.check_evaluation_is_deterministic(build64(inner_batch_size=2))


def test_checkpoint_round_trip_restores_identical_predictions(tmp_path):
  common.check_checkpoint_round_trip(build64, tmp_path)


@pytest.mark.parametrize("jit_compile, inner_batch_size", [(False, 0), (True, 0), (False, 4)])
def test_runs_in_tf_function_with_finite_loss_and_gradients(jit_compile, inner_batch_size):
  """(Not mini-batches under XLA: its stateless RNG draws other batches than
  the eager kernel this compares with.)"""
  learner = reptile.build(reptile.Config(hidden_sizes="8", inner_batch_size=inner_batch_size),
                          NUM_WAYS, DIM, "float32")
  common.check_finite_loss_and_gradients_in_tf_function(learner, jit_compile)


def test_wrong_shape_raises():
  with pytest.raises(ValueError, match="built for 5-way tasks of dimension 16"):
    build64().adapt(tf.zeros([1, 4, 1, DIM], tf.float64), tf.zeros([1, 4, 1], tf.int32),
                    training=False, seed=SEED)


@pytest.mark.parametrize("overrides, message", [
    ({"inner_optimizer": "rmsprop"}, "--reptile_inner_optimizer='rmsprop'"),
    ({"eval_inner_steps": -1}, "--reptile_eval_inner_steps=-1"),
    ({"inner_batch_size": -2}, "--reptile_inner_batch_size=-2"),
    ({"inner_beta2": 1.0}, "--reptile_inner_beta2=1.0"),
    ({"inner_lr": 0.0}, "--reptile_inner_lr=0.0"),
])
def test_bad_config_is_a_user_error(overrides, message):
  with pytest.raises(errors.ConfigError, match=message):
    build64(**overrides)


def test_every_config_field_has_help():
  for name, default, help_text in base.config_fields(reptile.Config):
    assert len(help_text) > 20, name
    assert isinstance(default, (int, float, bool, str)), name


# -- meta-training through the real Trainer (Reptile's own outer chain) -----------

def test_meta_trained_reptile_stays_at_the_class_mean_baseline_on_the_toy(tmp_path):
  """The toy (tests/test_maml.py) has no shared subspace to learn: the
  default head starts at NCM (99.2%) and 60 Reptile steps keep it there
  (measured 97.7%; 200 steps 95.7%: theta drifts towards slot noise)."""
  tf.random.set_seed(0)
  learner = reptile.build(reptile.Config(), NUM_WAYS, DIM, "float32")
  accuracy, ncm, at_init = common.meta_train_and_score(
      learner, tmp_path, outer=optim.OuterConfig(**reptile.SPEC.outer_defaults))
  assert ncm > 0.5
  assert at_init >= ncm - 0.02, (at_init, ncm)
  assert accuracy >= ncm - 0.04, (accuracy, ncm)
