"""--jit_compile: per-learner `auto` defaults and the fallback to plain TF when
XLA cannot compile a learner's graph."""

from absl import logging
import numpy as np
import pytest
import tensorflow as tf

from leo_suite.data import episodes
from leo_suite.models import base
from leo_suite.models import protonet
from leo_suite.models import registry
from leo_suite.training import evaluation
from leo_suite.training import optim
from leo_suite.training import trainer as trainer_lib
from leo_suite.training import xla
from tests import test_evaluation


def test_auto_follows_each_learners_measured_default():
  assert {m for m in registry.available() if xla.resolve("auto", m)} == {
      "leo", "maml", "imaml", "l2f", "protonet", "meta_lstm", "hallucination", "snail"}
  assert xla.resolve("true", "r2d2") and not xla.resolve("false", "snail")
  assert xla.resolve(True, "r2d2") and not xla.resolve(False, "leo")  # older runs
  with pytest.raises(ValueError, match="jit_compile"):
    xla.resolve("yes", "leo")
  # Evaluation's table readout: its own measured default.
  assert {m for m in registry.available() if xla.resolve_readout("auto", m)} == {
      "relation", "snail", "reptile", "l2f"}
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
    learner = registry.build("maml", registry.spec("maml").config_class(), spec.num_ways, test_evaluation.DIM)
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


# -- random draws made outside XLA (xla.Predrawn) ------------------------------

STOCHASTIC = {  # small configs of the learners that draw in meta-training
    "leo": dict(num_latents=4, inner_unroll_length=2, finetuning_unroll_length=2,
                dropout_rate=0.3),
    "r2d2": dict(projection_dim=8, dropout_rate=0.3),
    "hallucination": dict(num_hallucinated=2, noise_dim=4, hidden_sizes="8"),
    "snail": dict(input_dim=8, key_sizes="8,8", value_sizes="4,4", tc_filters=8,
                  sequence_length=7, dropout_rate=0.3),
}


def random_episode(dtype, num_tasks=4, num_ways=3, num_shots=2, num_queries=3, seed=0):
  rng = np.random.default_rng(seed)
  def rows(count):
    x = rng.standard_normal((num_tasks, num_ways, count, test_evaluation.DIM))
    return tf.constant(x / np.linalg.norm(x, axis=-1, keepdims=True), dtype)
  labels = lambda count: tf.constant(np.tile(np.arange(num_ways)[:, None], [num_tasks, 1, count])
                                     .reshape(num_tasks, num_ways, count), tf.int32)
  return episodes.Episode(rows(num_shots), labels(num_shots), rows(num_queries),
                          labels(num_queries))


def max_difference(a, b):
  return max(float(np.max(np.abs(x.numpy() - y.numpy())))
             for x, y in zip(tf.nest.flatten(a), tf.nest.flatten(b)))


@pytest.mark.parametrize("model", sorted(STOCHASTIC))
def test_compiled_step_draws_the_plain_steps_random_numbers(model):
  """Dropout, LEO's latent and weight samples and the generator's noise are
  drawn outside XLA and passed in, so the compiled loss and gradients equal
  plain TF's for the same seed (float64); another seed changes them."""
  config = registry.spec(model).config_class(**STOCHASTIC[model])
  learner = registry.build(model, config, 3, test_evaluation.DIM, "float64")
  episode = random_episode(tf.float64)
  compute = lambda e, s: learner.loss_and_gradients(e, seed=s)[:2]
  seed = tf.constant([7, 3], tf.int32)
  plain = tf.function(compute)(episode, seed)
  compiled = tf.function(xla.Predrawn(compute))(episode, seed)
  for expected, got in zip(tf.nest.flatten(plain), tf.nest.flatten(compiled)):
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-9, atol=1e-12)
  other = tf.function(xla.Predrawn(compute))(episode, tf.constant([7, 4], tf.int32))
  # (Hallucination's generator starts as G = identity: its noise shows in
  # the gradients, not yet in the loss.)
  assert max_difference(other, plain) > 1e-6
  if model == "leo":
    # Control: drawn inside XLA the same seed gives other numbers (XLA's
    # stateless normal), so the comparison above can tell.
    inside = tf.function(compute, jit_compile=True)(episode, seed)
    assert max_difference(inside, plain) > 1e-6


def test_a_learner_that_draws_nothing_is_compiled_as_one_call(tmp_path):
  split = test_evaluation.clustered_split([9] * 8)
  spec = episodes.EpisodeSpec(3, 2, 3)
  batch = next(iter(episodes.EpisodeSampler(split, spec).dataset(0, 4)))
  maml = registry.build("maml", registry.spec("maml").config_class(), spec.num_ways,
                        test_evaluation.DIM)
  config = trainer_lib.TrainConfig(checkpoint_path=str(tmp_path / "maml"),
                                   metatrain_batch_size=4, jit_compile=True)
  trainer = trainer_lib.Trainer(maml, config, episodes.EpisodeSampler(split, spec))
  assert np.isfinite(float(trainer.train_step(batch, 0)["loss"]))
  assert trainer._train_step._function.predrawn is False  # pylint: disable=protected-access


def test_draws_inside_a_loop_body_are_drawn_by_the_compiled_function():
  def draws_in_a_loop(x, seed):
    def body(i, total):
      step_seed = tf.random.experimental.stateless_fold_in(seed, i)
      return i + 1, total + base.random_draw("uniform", [3], step_seed, tf.float32)
    _, total = tf.while_loop(lambda i, _: i < 2, body, (tf.constant(0), x))
    return total + base.random_draw("normal", [3], seed, tf.float32)

  def flat(x, seed):
    return x + base.random_draw("normal", [3], seed, tf.float32)

  recorded = {}
  @tf.function
  def record(x, seed):
    recorded["loop"] = xla.record_draws(draws_in_a_loop, x, seed)
    recorded["flat"] = xla.record_draws(flat, x, seed)
    return x
  x, seed = tf.zeros([3]), tf.constant([1, 2])
  record(x, seed)
  assert recorded["loop"] is None and len(recorded["flat"]) == 1
  result = tf.function(xla.Predrawn(draws_in_a_loop))(x, seed)
  np.testing.assert_array_equal(
      result.numpy(), tf.function(draws_in_a_loop, jit_compile=True)(x, seed).numpy())


def test_replayed_draws_must_match_the_function():
  seed = tf.constant([1, 2])
  value = tf.ones([2])
  with base.replaying_draws([value]):
    assert base.random_draw("uniform", [2], seed, tf.float32) is value
    with pytest.raises(RuntimeError, match="more random draws than were recorded"):
      base.random_draw("uniform", [2], seed, tf.float32)
  with pytest.raises(RuntimeError, match="1 recorded draws were not used"):
    with base.replaying_draws([value]):
      pass
  with pytest.raises(RuntimeError, match="dtype"):
    with base.replaying_draws([value]):
      base.random_draw("bits", [2], seed, tf.uint32)
  with pytest.raises(RuntimeError, match="already"):
    with base.replaying_draws([]):
      with base.recording_draws():
        pass


# -- a step in parts, its next draws made during it (xla.PartsStep) -------------

def leo_compute(rate, dtype=tf.float64):
  config = registry.spec("leo").config_class(**dict(STOCHASTIC["leo"], dropout_rate=rate))
  learner = registry.build("leo", config, 3, test_evaluation.DIM, dtype.name)
  return lambda e, s: learner.loss_and_gradients(e, seed=s)


def test_part_size_is_the_largest_divisor_within_the_bound():
  assert [xla.part_size(12, b) for b in (1, 4, 5, 6, 11, 12, 40)] == [1, 4, 4, 6, 6, 12, 12]
  assert xla.part_size(7, 3) == 1


def test_split_draws_cuts_task_major_draws_only():
  whole = [tf.reshape(tf.range(24.0), [4, 6]), tf.reshape(tf.range(8, dtype=tf.int32), [4, 2])]
  part = [tf.zeros([2, 6]), tf.zeros([2, 2], tf.int32)]
  cut = xla.split_draws(whole, part, 2)
  np.testing.assert_array_equal(cut[1][0].numpy(), whole[0].numpy()[2:])
  np.testing.assert_array_equal(cut[0][1].numpy(), [[0, 1], [2, 3]])
  assert xla.split_draws(whole, part[:1], 2) is None                       # other count
  assert xla.split_draws(whole, [tf.zeros([2, 3]), part[1]], 2) is None    # other row shape
  assert xla.split_draws(whole, [tf.zeros([1, 6]), part[1]], 2) is None    # rows not B / P
  assert xla.split_draws(whole, [part[0], tf.zeros([2, 2])], 2) is None    # other dtype
  # A flat draw (words of a mask whose rows are not whole words) is not cut:
  # a part's words need not start where its entries do.
  assert xla.split_draws([tf.zeros([6])], [tf.zeros([3])], 2) is None


@pytest.mark.parametrize("rate, examples, parts", [
    (0.3, 12, 2),    # 16-bit mask fields: rows are whole words, cut in 2 parts of 2 tasks
    (0.3, 6, 4),
    (0.5, 12, 1),    # 1-bit fields: 3 x 3 x 16 = 144-entry query rows are not
])                   # whole words, so the draws are not cut
def test_parts_step_is_the_one_call_loss_and_gradients_step_after_step(rate, examples, parts):
  """The parts' summed shares equal one call on the whole meta-batch with its
  own draws (float64), at every step of a run: the next step's draws made
  during a step are that step's (seed [s, n + 1]); a seed out of sequence or
  other shapes draw their own."""
  compute = leo_compute(rate)
  step = xla.PartsStep(compute, lambda loss, grads, metrics: (loss, grads), examples)
  reference = tf.function(lambda e, s: compute(e, s)[:2])
  calls = [(random_episode(tf.float64, seed=i), [7, n]) for i, n in enumerate([0, 1, 2, 5, 6])]
  calls.append((random_episode(tf.float64, num_tasks=2, seed=9), [7, 7]))
  losses = []
  for episode, seed in calls:
    seed = tf.constant(seed, tf.int32)
    got, expected = step(episode, seed), reference(episode, seed)
    if not losses:
      assert step.parts == parts
    for a, b in zip(tf.nest.flatten(got), tf.nest.flatten(expected)):
      np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-9, atol=1e-12)
    losses.append(float(got[0]))
  assert len(set(losses)) == len(losses)


def test_parts_step_with_a_draw_in_a_loop_body_lets_the_compiled_call_draw():
  weight = tf.Variable(tf.ones([test_evaluation.DIM], tf.float64))

  def compute(episode, seed):
    def body(i, total):
      return i + 1, total + base.random_draw(
          "normal", [4], tf.random.experimental.stateless_fold_in(seed, i), tf.float64)
    with tf.GradientTape() as tape:
      _, noise = tf.while_loop(lambda i, _: i < 2, body, (0, tf.zeros([4], tf.float64)))
      per_task = tf.einsum("bnkd,d->b", episode.support_x, weight) * noise
      loss = tf.reduce_mean(per_task)
    return loss, tape.gradient(loss, [weight]), {}

  step = xla.PartsStep(compute, lambda loss, grads, metrics: (loss, grads), 6)
  episode, seed = random_episode(tf.float64), tf.constant([3, 0], tf.int32)
  got = step(episode, seed)
  expected = tf.function(lambda e, s: compute(e, s)[:2], jit_compile=True)(episode, seed)
  assert step.parts == 1
  for a, b in zip(tf.nest.flatten(got), tf.nest.flatten(expected)):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12)


@pytest.mark.parametrize("examples", [None, 6])
def test_trainer_xla_step_takes_the_plain_steps_draws(tmp_path, examples):
  """The Trainer's compiled LEO step (update included), as one compiled call
  (xla.WholeStep around xla.Predrawn) and in 4 parts of one task
  (xla.PartsStep), records its draws with the step's seed: its losses and
  variables follow the plain step's."""
  split = test_evaluation.clustered_split([9] * 8)
  spec = episodes.EpisodeSpec(3, 2, 3)
  batches = list(episodes.EpisodeSampler(split, spec).dataset(0, 4).take(3))
  results = {}
  for jit in (False, True):
    tf.random.set_seed(1)
    learner = registry.build("leo", registry.spec("leo").config_class(**STOCHASTIC["leo"]),
                             spec.num_ways, test_evaluation.DIM)
    learner.training_step_examples = examples
    config = trainer_lib.TrainConfig(checkpoint_path=str(tmp_path / f"run_{jit}"),
                                     metatrain_batch_size=4, jit_compile=jit)
    trainer = trainer_lib.Trainer(learner, config, episodes.EpisodeSampler(split, spec))
    losses = [float(trainer.train_step(e, step)["loss"]) for step, e in enumerate(batches)]
    results[jit] = losses, [v.numpy() for v in learner.trainable_variables]
  function = trainer._train_step._function  # pylint: disable=protected-access
  if examples:
    assert isinstance(function, xla.PartsStep) and function.parts == 4
  else:
    assert isinstance(function, xla.WholeStep) and function.predrawn is True
  np.testing.assert_allclose(results[True][0], results[False][0], rtol=1e-5)
  assert len(set(results[False][0])) == 3
  for compiled, plain in zip(results[True][1], results[False][1]):
    np.testing.assert_allclose(compiled, plain, rtol=1e-4, atol=1e-6)
