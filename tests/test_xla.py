"""--jit_compile: per-learner `auto` defaults and the fallback to plain TF when
XLA cannot compile a learner's graph."""

from absl import logging
import numpy as np
import pytest
import tensorflow as tf

from leo_suite.data import episodes
from leo_suite.models import protonet
from leo_suite.models import registry
from leo_suite.training import evaluation
from leo_suite.training import optim
from leo_suite.training import trainer as trainer_lib
from leo_suite.training import xla
from tests import test_evaluation


def test_auto_follows_each_learners_measured_default():
  assert {m for m in registry.available() if xla.resolve("auto", m)} == {
      "maml", "imaml", "l2f", "protonet", "meta_lstm", "hallucination", "snail"}
  assert xla.resolve("true", "leo") and not xla.resolve("false", "snail")
  assert xla.resolve(True, "leo") and not xla.resolve(False, "snail")  # older runs
  with pytest.raises(ValueError, match="jit_compile"):
    xla.resolve("yes", "leo")
  # Evaluation's table readout: its own measured default.
  assert {m for m in registry.available() if xla.resolve_readout("auto", m)} == {"relation"}
  assert xla.resolve_readout("true", "leo") and not xla.resolve_readout("false", "relation")
  with pytest.raises(ValueError, match="jit_compile"):
    xla.resolve_readout("yes", "relation")


class PyFunctionProtoNet(protonet.ProtoNet):
  """ProtoNet with a metric computed by tf.py_function: no XLA kernel."""

  def meta_loss(self, episode, *, training, seed):
    loss, metrics = super().meta_loss(episode, training=training, seed=seed)
    metrics["host"] = tf.py_function(lambda: np.float32(1.0), [], tf.float32)
    return loss, metrics

  def adapt(self, support_x, support_y, *, training, seed):
    state = super().adapt(support_x, support_y, training=training, seed=seed)
    return state + 0 * tf.py_function(lambda: np.float32(0.0), [], tf.float32)


def warnings_of(monkeypatch):
  seen = []
  monkeypatch.setattr(logging, "warning", lambda message, *args: seen.append(message % args))
  return seen


def test_a_graph_xla_cannot_compile_runs_plain_with_one_log_line(monkeypatch):
  seen = warnings_of(monkeypatch)
  calls = []

  def build(jit):
    calls.append(jit)
    return tf.function(lambda x: tf.py_function(lambda a: a * 2, [x], tf.float32) + 1,
                       jit_compile=jit)
  function = xla.WithFallback(build, True, "toy")
  assert function(tf.constant(2.0)).numpy() == 5.0
  assert function(tf.constant(3.0)).numpy() == 7.0
  assert calls == [True, False] and not function.jit
  assert len(seen) == 1 and "toy: XLA cannot compile" in seen[0] and "EagerPyFunc" in seen[0]


def test_errors_that_are_not_compilation_failures_still_raise():
  def bad_input(x):
    raise tf.errors.InvalidArgumentError(None, None, f"bad input {x.shape}")
  calls = []
  function = xla.WithFallback(lambda jit: calls.append(jit) or tf.function(
      bad_input, jit_compile=jit), True, "toy")
  with pytest.raises(tf.errors.InvalidArgumentError, match="bad input"):
    function(tf.constant(-1.0))
  assert calls == [True] and function.jit


def test_trainer_and_evaluator_fall_back_and_match_plain(tmp_path, monkeypatch):
  seen = warnings_of(monkeypatch)
  split = test_evaluation.clustered_split([9] * 8)
  spec = episodes.EpisodeSpec(4, 2, 3)
  losses = {}
  for jit in (False, True):
    tf.random.set_seed(1)
    learner = PyFunctionProtoNet(protonet.Config(), spec.num_ways, test_evaluation.DIM)
    config = trainer_lib.TrainConfig(
        checkpoint_path=str(tmp_path / f"run_{jit}"), num_steps_limit=3,
        metatrain_batch_size=4, checkpoint_steps=3, log_steps=1, jit_compile=jit,
        outer=optim.OuterConfig(learning_rate=1e-2))
    trainer = trainer_lib.Trainer(learner, config, episodes.EpisodeSampler(split, spec))
    assert trainer.train() == 3
    losses[jit] = [v.numpy() for v in learner.trainable_variables]
    evaluator = evaluation.Evaluator(learner, jit_compile=jit)
    losses[jit].append(evaluator.fixed_accuracy(
        episodes.EpisodeSampler(split, spec), 2, 10, 5, method="table"))
  for plain, fallen_back in zip(losses[False], losses[True]):
    np.testing.assert_array_equal(plain, fallen_back)
  compile_lines = [line for line in seen if "XLA cannot compile" in line]
  assert len(compile_lines) == 2, seen  # the training step and evaluation's adaptation


def test_whole_step_under_xla_matches_plain_and_keeps_the_nan_guard(tmp_path):
  """On one device XLA compiles the whole step, outer update included."""
  split = test_evaluation.clustered_split([9] * 8)
  spec = episodes.EpisodeSpec(4, 2, 3)
  sampler = episodes.EpisodeSampler(split, spec)
  episodes_ = list(sampler.dataset(0, 4).take(3))
  poisoned = episodes_[1]._replace(query_x=episodes_[1].query_x * np.nan)
  results = {}
  for jit in (False, True):
    tf.random.set_seed(1)
    module = registry.learner_module("maml")
    learner = registry.build("maml", module.Config(), spec.num_ways, test_evaluation.DIM)
    config = trainer_lib.TrainConfig(
        checkpoint_path=str(tmp_path / f"run_{jit}"), metatrain_batch_size=4, jit_compile=jit,
        outer=optim.OuterConfig(learning_rate=1e-2))
    trainer = trainer_lib.Trainer(learner, config, sampler)
    skipped = [float(trainer.train_step(e, step)["skipped"])
               for step, e in enumerate([episodes_[0], poisoned, episodes_[2]])]
    assert skipped == [0.0, 1.0, 0.0]
    assert int(trainer.step.numpy()) == 3
    results[jit] = [v.numpy() for v in learner.trainable_variables]
    assert all(np.isfinite(v).all() for v in results[jit])
  for plain, compiled in zip(results[False], results[True]):
    np.testing.assert_allclose(compiled, plain, rtol=1e-4, atol=1e-6)
