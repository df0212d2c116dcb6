"""Hallucination (Wang et al. 2018): exact reduction to the base learner with
no generated examples, what the generator adds (seed labels, seeds from the
class only, identity at init), the noise (seeded in training, fixed at
evaluation), end-to-end gradients, and the checks every learner must pass
(shared with tests/test_maml.py)."""

import numpy as np
import pytest
import tensorflow as tf

from leo_suite import errors
from leo_suite.models import hallucination
from leo_suite.models import registry
from tests import learner_checks
from tests import test_maml as common

NUM_WAYS, DIM, SEED = common.NUM_WAYS, common.DIM, common.SEED
SMALL = dict(noise_dim=4, hidden_sizes="8")


def build(dtype="float64", **overrides):
  config = hallucination.Config(**dict(SMALL, **overrides))
  return hallucination.build(config, NUM_WAYS, DIM, dtype)


def build_perturbed(**overrides):
  """A learner whose generator is not the identity (and whose every layer
  gets a gradient: at init only G's zero output layer does)."""
  learner = build(**overrides)
  common.perturb_variables(learner, seed=3)
  return learner


def logits_of(learner, episode, training=False, seed=SEED):
  state = learner.adapt(episode.support_x, episode.support_y, training=training, seed=seed)
  return learner.predict(state, episode.query_x, training=training, seed=seed).numpy()


def base_twin(learner):
  """The base learner alone (default Config) with `learner`'s base variables."""
  name = learner.config.base_model
  twin = registry.build(name, registry.spec(name).config_class(), NUM_WAYS, DIM,
                        learner.dtype.name)
  assert len(twin.variables) == len(learner.base_learner.variables)
  for mine, theirs in zip(learner.base_learner.variables, twin.variables):
    assert mine.name.split("/", 1)[1] == theirs.name
    theirs.assign(mine)
  return twin


# -- exact reduction -----------------------------------------------------------------

@pytest.mark.parametrize("base_model", ["protonet", "maml", "leo", "snail"])
def test_zero_generated_examples_is_exactly_the_base_learner(base_model):
  # LEO's default inner loop (rate 1, 5 steps) diverges from about 3 in 10
  # random initialisations on these 16-d toy tasks (measured over global seeds
  # 0-39): fix the draw so the test compares finite losses.
  tf.random.set_seed(0)
  learner = build(base_model=base_model, num_hallucinated=0)
  twin = base_twin(learner)
  episode = common.make_episode(num_shots=2)
  for training in (False, True):   # LEO's training path draws noise: same seeds
    np.testing.assert_array_equal(logits_of(learner, episode, training),
                                  logits_of(twin, episode, training))
    loss, metrics = learner.meta_loss(episode, training=training, seed=SEED)
    twin_loss, twin_metrics = twin.meta_loss(episode, training=training, seed=SEED)
    assert np.isfinite(loss.numpy()) and loss.numpy() == twin_loss.numpy()
    assert metrics.keys() == twin_metrics.keys()
  loss, grads, _ = learner.loss_and_gradients(episode, seed=SEED)
  twin_loss, twin_grads, _ = twin.loss_and_gradients(episode, seed=SEED)
  assert loss.numpy() == twin_loss.numpy()
  by_variable = {v.ref(): g for v, g in zip(learner.trainable_variables, grads)}
  for variable, twin_grad in zip(learner.base_learner.trainable_variables, twin_grads):
    np.testing.assert_array_equal(by_variable.pop(variable.ref()).numpy(), twin_grad.numpy())
  assert len(by_variable) == len(learner.generator.trainable_variables)
  assert all(np.all(g.numpy() == 0) for g in by_variable.values())   # G unused


def test_state_is_the_base_learners_state_on_the_augmented_support():
  learner = build_perturbed(num_hallucinated=3)
  twin = base_twin(learner)
  episode = common.make_episode(num_shots=2)
  support_x, support_y = learner.augment(episode.support_x, episode.support_y,
                                         training=False, seed=SEED)
  assert support_x.shape == (3, NUM_WAYS, 5, DIM) and support_y.shape == (3, NUM_WAYS, 5)
  state = learner.adapt(episode.support_x, episode.support_y, training=False, seed=SEED)
  np.testing.assert_array_equal(
      state.numpy(), twin.adapt(support_x, support_y, training=False, seed=SEED).numpy())


def test_one_shot_identity_generator_leaves_protonet_unchanged():
  """At init G(x, z) = x: 1-shot prototypes (mean of x and its M copies) are x."""
  learner = build(num_hallucinated=4)
  assert learner.config.base_model == "protonet"
  common.perturb_variables(learner.base_learner, seed=1)
  episode = common.make_episode(num_shots=1)
  for training in (False, True):
    np.testing.assert_allclose(logits_of(learner, episode, training),
                               logits_of(base_twin(learner), episode, training),
                               rtol=1e-12, atol=1e-12)


# -- the generated examples ----------------------------------------------------------

def test_generated_rows_carry_their_seeds_label_and_come_from_their_class():
  num_shots, generated = 2, 5
  episode = common.make_episode(num_shots=num_shots)
  labels = np.stack([np.random.default_rng(b).permutation(NUM_WAYS) for b in range(3)])
  support_y = tf.constant(np.repeat(labels[:, :, None], num_shots, 2).astype(np.int32))

  def augment(learner, support_x):
    return [t.numpy() for t in learner.augment(support_x, support_y, training=True,
                                               seed=SEED)]

  identity = build(num_hallucinated=generated)
  x, y = augment(identity, episode.support_x)
  seeds = np.arange(generated) % num_shots
  np.testing.assert_array_equal(y[:, :, num_shots:], support_y.numpy()[:, :, seeds])
  np.testing.assert_array_equal(x[:, :, :num_shots], episode.support_x.numpy())
  np.testing.assert_allclose(x[:, :, num_shots:], episode.support_x.numpy()[:, :, seeds],
                             rtol=1e-12)   # G = identity at init
  # A trained-looking G: changing class 2's support changes only class 2's rows.
  learner = build_perturbed(num_hallucinated=generated)
  before, _ = augment(learner, episode.support_x)
  changed = episode.support_x.numpy().copy()
  changed[:, 2] = common.unit_rows(np.random.default_rng(9), changed[:, 2].shape)
  after, _ = augment(learner, tf.constant(changed))
  others = [c for c in range(NUM_WAYS) if c != 2]
  np.testing.assert_array_equal(after[:, others], before[:, others])
  assert np.abs(after[:, 2, num_shots:] - before[:, 2, num_shots:]).min() > 1e-6
  np.testing.assert_allclose(np.linalg.norm(after, axis=-1), 1.0, rtol=1e-12)


def test_training_noise_follows_the_seed_evaluation_noise_is_fixed_per_task():
  learner = build_perturbed(num_hallucinated=3)
  episode = common.make_episode(num_tasks=3, num_shots=1)

  def generated(training, seed, tasks=slice(None)):
    x, _ = learner.augment(episode.support_x[tasks], episode.support_y[tasks],
                           training=training, seed=tf.constant(seed))
    return x[:, :, 1:].numpy()

  np.testing.assert_array_equal(generated(True, [1, 2]), generated(True, [1, 2]))
  assert np.abs(generated(True, [1, 2]) - generated(True, [5, 2])).min() > 1e-6
  evaluation = generated(False, [1, 2])
  np.testing.assert_array_equal(evaluation, generated(False, [5, 2]))
  assert np.abs(evaluation - generated(True, [1, 2])).max() > 1e-6
  # A task's evaluation noise does not depend on the batch (or replica) it is in.
  np.testing.assert_array_equal(generated(False, [0, 0], slice(2, 3)), evaluation[2:3])


def test_noise_is_standard_normal_and_the_same_under_xla():
  seed = tf.constant([-4, 2])   # negative entries are what XLA converts otherwise
  draw = lambda s: hallucination.standard_normal(tf.constant([200, 500]), s, tf.float64)
  z = draw(seed).numpy()
  assert abs(z.mean()) < 0.01 and abs(z.std() - 1.0) < 0.01
  assert abs(np.mean(z ** 4) - 3.0) < 0.15   # normal kurtosis (s.e. 0.03)
  assert abs(np.corrcoef(z[:, :-1].ravel(), z[:, 1:].ravel())[0, 1]) < 0.01
  np.testing.assert_allclose(tf.function(draw, jit_compile=True)(seed).numpy(), z,
                             rtol=1e-12, atol=1e-12)


def test_query_loss_trains_the_generator_end_to_end():
  learner = build()   # at init only G's output layer receives a gradient
  episode = common.make_episode(num_shots=1)
  _, grads, _ = learner.loss_and_gradients(episode, seed=SEED)
  by_variable = {v.ref(): g.numpy() for v, g in zip(learner.trainable_variables, grads)}
  output_layer = learner.generator.params[-2]
  assert np.abs(by_variable[output_layer.ref()]).max() > 1e-6


# -- the checks every learner must pass -------------------------------------------

def test_adaptation_lowers_the_support_loss():
  """ProtoNet has no support loss; with a MAML base the inner loop, run on the
  augmented support, still lowers the loss on the real support."""
  learner = build_perturbed(base_model="maml", num_hallucinated=2)
  episode = common.make_episode(num_shots=1)
  start = learner.base_learner.head.tiled(3)
  before = common.per_task_support_loss(learner, start, episode)
  for training in (True, False):
    adapted = learner.adapt(episode.support_x, episode.support_y, training=training,
                            seed=SEED)
    after = common.per_task_support_loss(learner, adapted, episode)
    assert np.all(after < before - 1e-3), (training, before, after)


def test_evaluation_is_deterministic():
  common.check_evaluation_is_deterministic(build_perturbed(num_hallucinated=2))


def test_checkpoint_round_trip_restores_identical_predictions(tmp_path):
  common.check_checkpoint_round_trip(lambda: build(num_hallucinated=2), tmp_path)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_runs_in_tf_function_with_finite_loss_and_gradients(jit_compile):
  learner = build("float32", num_hallucinated=2)
  common.perturb_variables(learner, seed=4)
  common.check_finite_loss_and_gradients_in_tf_function(learner, jit_compile)
  # The training noise is a pure function of the step's seed.
  step = tf.function(lambda e, s: learner.loss_and_gradients(e, seed=s),
                     jit_compile=jit_compile)
  episode = common.make_episode(dtype=np.float32)
  first, again = step(episode, SEED), step(episode, SEED)
  other = step(episode, tf.constant([8, 1]))
  assert np.isfinite(first[0].numpy()) and first[0].numpy() == again[0].numpy()
  assert first[0].numpy() != other[0].numpy()
  for g, g_again in zip(first[1], again[1]):
    np.testing.assert_array_equal(g.numpy(), g_again.numpy())


def test_wrong_shape_raises():
  with pytest.raises(ValueError, match="built for 5-way tasks of dimension 16"):
    build().adapt(tf.zeros([1, 4, 1, DIM], tf.float64), tf.zeros([1, 4, 1], tf.int32),
                  training=False, seed=SEED)


@pytest.mark.parametrize("overrides, message", [
    ({"base_model": "nope"}, "--hallucination_base_model='nope': choose one of"),
    ({"base_model": "hallucination"}, "--hallucination_base_model='hallucination'"),
    ({"base_model": "imaml"}, "--hallucination_base_model='imaml' computes its own"),
    ({"num_hallucinated": -1}, "--hallucination_num_hallucinated=-1"),
    ({"noise_dim": 0}, "--hallucination_noise_dim=0"),
    ({"hidden_sizes": "8,x"}, "--hallucination_hidden_sizes='8,x'"),
])
def test_bad_config_is_a_user_error(overrides, message):
  with pytest.raises(errors.ConfigError, match=message):
    registry.build("hallucination", hallucination.Config(**overrides), NUM_WAYS, DIM)


def test_every_config_field_has_help():
  learner_checks.check_config_fields_have_help(hallucination.Config)


# -- meta-training through the real Trainer ---------------------------------------

def test_meta_trained_hallucination_keeps_protonet_at_the_class_mean_baseline(tmp_path):
  """ProtoNet starts at NCM here (its linear map starts as an isometry); the
  generator, trained with it, must not spoil that (98.7% after 60 steps,
  ProtoNet alone 99.1%, NCM 99.2%)."""
  tf.random.set_seed(0)
  learner_checks.check_meta_training_reaches_ncm(
      hallucination.build(hallucination.Config(), NUM_WAYS, DIM), tmp_path,
      "hallucination(protonet)", steps=60, outer_lr=1e-3, margin=0.02)


@pytest.mark.parametrize("num_shots", [1, 3, 5])
def test_generator_equals_its_mlp_on_concatenated_seed_and_noise(num_shots):
  """G's first layer is split (x W_x on the K real rows when K < M, z W_z
  on z as given): the same G(x, z) = norm(x + MLP([x; z])) as the paper's
  concatenated input, with z per task or one z shared by every task."""
  learner = build_perturbed(num_hallucinated=4)
  generator = learner.generator
  rng = np.random.default_rng(num_shots)
  real = tf.constant(rng.standard_normal((2, NUM_WAYS, num_shots, DIM)))
  seed_index = tf.range(4) % num_shots
  z = tf.constant(rng.standard_normal((2, NUM_WAYS, 4, SMALL["noise_dim"])))

  def reference(z):
    seeds = tf.gather(real, seed_index, axis=2).numpy()
    h = np.concatenate([seeds, np.broadcast_to(z, seeds.shape[:3] + z.shape[-1:])], -1)
    layers = [p.numpy() for p in generator.params]
    for i in range(0, len(layers), 2):
      h = h @ layers[i] + layers[i + 1]
      if i + 2 < len(layers):
        h = np.maximum(h, 0.0)
    out = seeds + h
    return out / np.linalg.norm(out, axis=-1, keepdims=True)

  np.testing.assert_allclose(generator(real, seed_index, z).numpy(), reference(z.numpy()),
                             rtol=1e-12, atol=1e-12)
  shared = z[:1]
  np.testing.assert_allclose(generator(real, seed_index, shared).numpy(),
                             reference(shared.numpy()), rtol=1e-12, atol=1e-12)
