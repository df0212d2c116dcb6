"""Data hallucination: low-shot learning from imaginary data (Wang, Girshick,
Hebert & Hariharan, CVPR 2018), on pre-computed embeddings.

A generator G(x, z; w_G) turns a real support example x of a class (the
"seed") and noise z into an extra example of that class. Every class of a
task gets M = `num_hallucinated` generated examples, so the meta-learner it
feeds (the paper's ProtoNet / matching network / PMN; here any learner of the
suite, `base_model`) adapts on K + M examples per class:

    S'_c = S_c  u  { (G(x_{c, j mod K}, z_{c,j}), c) : j = 0..M-1 },

and the query loss of the base learner on S' is back-propagated end to end
into the base learner and into w_G (no GAN loss, as the paper).

Details of this port:
  * G(x, z) = x + MLP([x; z]), a ReLU MLP whose output layer starts at zero,
    so G starts as the identity on the seed. The paper's G is a 3-layer MLP
    initialised to a block-diagonal identity, which is the identity on its
    non-negative (post-ReLU ResNet) features only; the residual form keeps
    that starting point on signed, L2-normalised embeddings. Outputs are
    L2-normalised like the real embeddings (`normalize`).
  * Seeds: generated example j of a class uses the class's real example
    j mod K (balanced; the paper draws seeds at random), so a generated row
    always carries its seed's label and seeds never cross classes.
  * Noise z ~ N(0, I / z_dim), so ||z|| ~ 1 = ||x|| on unit-norm embeddings
    (with N(0, I) and z_dim = 64 the noise outweighs the seed 8:1 in G's
    input; measured on test_maml's toy problem, 5-way 1-shot, 60 steps:
    96.7% with N(0, I), 98.7% with N(0, I / z_dim), ProtoNet alone 99.1%,
    NCM 99.2%). In training z is drawn per task from the step's stateless
    seed; at evaluation one fixed tensor [N, M, z_dim] (a constant seed)
    shared by all tasks, so evaluation is deterministic and a task's
    prediction does not depend on the batch it is in (or on the replica).
    z is drawn by Box-Muller from stateless Philox bits (`standard_normal`),
    so the noise is the same with and without XLA (`jit_compile`).
  * The base learner is built with its default Config through the registry
    and is a sub-module: its variables are part of this learner's trainable
    variables and checkpoint. Its meta_loss (with any extra terms, e.g.
    LEO's KL) is used on the augmented episode, and it gets the very seeds
    it would get alone, so with M = 0 this learner IS its base learner
    (same logits, loss and gradients). State = the base learner's state.
  * A base learner through which G gets no gradient is refused with a
    ConfigError naming it (G would stay untrained): one with its own
    `loss_and_gradients` (iMAML's implicit meta-gradient, Reptile's
    displacement: neither differentiates through the support set) when it
    is built, and any other whose meta-loss has no gradient path to G's
    weights (Meta-LSTM reads its support only through stop_gradient-ed
    gradients and losses) at its first meta-gradient: `loss_and_gradients`
    asks the gradient graph itself which weights the loss reaches.

Measured through the runner (synthetic data, demo preset, 5-way 1-shot, 300
steps, 1000 test tasks): 90.5% test accuracy with ProtoNet as base (NCM
49.7%); its validation accuracy was 87.1% after 100 steps.
"""

import dataclasses
import math
from typing import ClassVar

import tensorflow as tf

from leo_suite import errors
from leo_suite.data.episodes import Episode
from leo_suite.models import base
from leo_suite.models import heads
from leo_suite.models import registry

# fold_in stream of the generator's training noise (the base learner's own
# SeedStream counts from 1, so its seeds are untouched) and the evaluation seed.
NOISE_STREAM = 0x4A11
EVAL_NOISE_SEED = (2018, 6)


@dataclasses.dataclass(frozen=True)
class Config:
  """Hallucination hyperparameters (flags --hallucination_<field>)."""
  flag_prefix: ClassVar[str] = "hallucination_"
  base_model: str = base.option(
      "protonet", "The meta-learner fed with the augmented support set (the "
              "paper: ProtoNet, matching network or PMN); any learner of the "
              "suite, built with its default Config.")
  num_hallucinated: int = base.option(
      4, "M: generated examples G(x, z) added to each class's K real ones, "
         "from seeds x of that class (0 = the base learner alone).")
  noise_dim: int = base.option(
      64, "Dimension of the noise z ~ N(0, I / z_dim) fed to G with the "
          "seed x (scaled so that ||z|| ~ 1, like the unit-norm seed).")
  hidden_sizes: str = base.option(
      "512,512", "Hidden widths of G's ReLU MLP on [x; z], comma separated "
                 "(the paper's G: a 3-layer MLP, i.e. two hidden layers).")
  normalize: bool = base.option(
      True, "L2-normalise G's outputs, like the real (unit-norm) embeddings.")

  def validate(self):
    """Raises ConfigError naming the flag for a value the method cannot run with."""
    if self.base_model == "hallucination" or self.base_model not in registry.LEARNERS:
      choices = sorted(set(registry.available()) - {"hallucination"})
      raise errors.ConfigError(
          f"--{self.flag_prefix}base_model={self.base_model!r}: choose one of "
          f"{', '.join(choices)}")
    base.check_at_least(self, self.flag_prefix, {"num_hallucinated": 0, "noise_dim": 1})
    heads.parse_hidden_sizes(self.hidden_sizes, self.flag_prefix + "hidden_sizes")


def standard_normal(shape, seed, dtype):
  """z ~ N(0, I) of `shape` by Box-Muller on stateless Philox bits.

  tf.random.stateless_normal draws other numbers under XLA than without it;
  the raw bits agree for non-negative seeds (XLA converts a negative seed
  entry differently, so the sign bit is cleared), so this noise does not
  depend on jit_compile (up to the rounding of log and cos). 24 bits per
  uniform: |z| < 5.9.
  """
  seed = tf.bitwise.bitwise_and(tf.cast(seed, tf.int32), 0x7FFFFFFF)
  bits = base.random_draw("bits", tf.concat([[2], shape], 0), seed, tf.uint32)
  uniform = (tf.cast(tf.bitwise.right_shift(bits, 8), dtype) + 0.5) / 2.0 ** 24
  radius = tf.sqrt(-2.0 * tf.math.log(uniform[0]))
  return radius * tf.cos((2.0 * math.pi) * uniform[1])


class Generator(heads.HeadParams):
  """G(x, z) = x + MLP([x; z]), output layer initialised at zero (G = identity)."""

  def __init__(self, embedding_dim, noise_dim, hidden_sizes, normalize, dtype):
    super().__init__(embedding_dim, embedding_dim + noise_dim, hidden_sizes,
                     dtype=dtype, name="generator", output_init="zeros")
    self.normalize = normalize

  def __call__(self, real_x, seed_index, z):
    """G(x_s, z) [B, N, M, D] for the seeds x_s = real_x[:, :, seed_index]
    (real_x [B, N, K, D], z [B or 1, N, M, z_dim]).

    When K < M (1-shot), G's first layer on [x; z] is split into
    x W_x + z W_z + b, and x W_x is computed on the K real rows before they
    are repeated to the M seeds (at 1-shot with M = 4, a quarter of the
    generator's work; 1-shot evaluation adaptation 10.4 -> 9.1 ms per 25
    tasks with XLA). Otherwise one product on the concatenation, which was
    the faster form at 5-shot.
    """
    dim = real_x.shape[-1]
    first_w, first_b = self.params[0], self.params[1]
    seeds_x = tf.gather(real_x, seed_index, axis=2)
    num_real, num_seeds = real_x.shape[2], seed_index.shape[0]
    if num_real is not None and num_seeds is not None and num_real < num_seeds:
      x_part = tf.gather(base.dense(real_x, first_w[:dim]), seed_index, axis=2)
      h = x_part + base.dense(z, first_w[dim:]) + first_b
    else:
      z = tf.broadcast_to(z, tf.concat([tf.shape(seeds_x)[:3], tf.shape(z)[3:]], 0))
      h = base.dense(tf.concat([seeds_x, z], axis=-1), first_w) + first_b
    num_layers = len(self.params) // 2
    for layer in range(1, num_layers):
      h = base.dense(tf.nn.relu(h), self.params[2 * layer]) + self.params[2 * layer + 1]
    out = seeds_x + h
    return tf.math.l2_normalize(out, axis=-1) if self.normalize else out


class Hallucination(base.Learner):
  """A generator G feeding a base learner with M extra examples per class."""

  def __init__(self, config: Config, num_ways: int, embedding_dim: int,
               dtype=tf.float32, name="hallucination"):
    super().__init__(num_ways, embedding_dim, dtype=dtype, name=name)
    config.validate()
    self.config = config
    base_spec = registry.spec(config.base_model)
    self.base_learner = base_spec.build(base_spec.config_class(), num_ways, embedding_dim,
                                        self.dtype.name)
    if type(self.base_learner).loss_and_gradients is not base.Learner.loss_and_gradients:
      raise errors.ConfigError(
          f"--{config.flag_prefix}base_model={config.base_model!r} computes its own "
          "meta-gradient without differentiating through its support set, so "
          "the generator would not be trained; choose another base learner")
    self.generator = Generator(embedding_dim, config.noise_dim,
                               heads.parse_hidden_sizes(config.hidden_sizes),
                               config.normalize, self.dtype)

  def noise(self, shape, *, training, seed):
    """z ~ N(0, I / z_dim): [B, N, M, z_dim] from `seed` in training; at
    evaluation one fixed draw [1, N, M, z_dim] shared by every task."""
    full_shape = tf.concat([shape, [self.config.noise_dim]], 0)
    if training:
      z = standard_normal(full_shape, tf.random.experimental.stateless_fold_in(
          tf.cast(seed, tf.int32), NOISE_STREAM), self.dtype)
    else:   # [1, N, M, z_dim]: broadcast over the tasks by its consumers
      z = standard_normal(tf.concat([[1], full_shape[1:]], 0),
                          tf.constant(EVAL_NOISE_SEED, tf.int32), self.dtype)
    return z / math.sqrt(self.config.noise_dim)

  def augment(self, support_x, support_y, *, training, seed):
    """S -> S' = S plus M generated examples per class: [B, N, K + M, D], [B, N, K + M]."""
    num_generated = self.config.num_hallucinated
    if num_generated == 0:
      return support_x, support_y
    support_x = tf.cast(support_x, self.dtype)
    seed_index = tf.range(num_generated) % tf.shape(support_x)[2]   # j mod K
    shape = tf.shape(support_x)
    z = self.noise(tf.stack([shape[0], shape[1], num_generated]), training=training,
                   seed=seed)
    generated = self.generator(support_x, seed_index, z)              # [B, N, M, D]
    return (tf.concat([support_x, generated], axis=2),
            tf.concat([support_y, tf.gather(support_y, seed_index, axis=2)], axis=2))

  def adapt(self, support_x, support_y, *, training, seed):
    """The base learner's state, adapted on the augmented support set."""
    self.check_episode_shape(support_x)
    return self.base_learner.adapt(
        *self.augment(support_x, support_y, training=training, seed=seed),
        training=training, seed=seed)

  def predict(self, state, query_x, *, training, seed):
    return self.base_learner.predict(state, query_x, training=training, seed=seed)

  def readout(self, state):
    return self.base_learner.readout(state)

  def regularization(self):
    return self.base_learner.regularization()

  def loss_and_gradients(self, episode, *, seed):
    """base.Learner's (unconnected variables get zero gradients), after
    refusing a base learner whose meta-loss has no gradient path to G (a
    structural check of the gradient graph: no extra computation)."""
    variables = self.trainable_variables
    with tf.GradientTape() as tape:
      loss, metrics = self.meta_loss(episode, training=True, seed=seed)
    grads = tape.gradient(loss, variables)
    generator = {v.ref() for v in self.generator.trainable_variables}
    unreached = [v.name for v, g in zip(variables, grads) if v.ref() in generator and g is None]
    if self.config.num_hallucinated and unreached:
      raise errors.ConfigError(
          f"--{self.config.flag_prefix}base_model={self.config.base_model!r}: no gradient of its "
          f"meta-loss reaches the generator ({', '.join(unreached)}): it does not "
          "differentiate through its support examples, so the generator would not be "
          "trained; choose another base learner")
    grads = [tf.zeros_like(v) if g is None else g for v, g in zip(variables, grads)]
    return loss, grads, metrics

  def meta_loss(self, episode, *, training, seed):
    """The base learner's meta-loss (and metrics) on the augmented episode."""
    support_x, support_y = self.augment(episode.support_x, episode.support_y,
                                        training=training, seed=seed)
    return self.base_learner.meta_loss(
        Episode(support_x, support_y, episode.query_x, episode.query_y),
        training=training, seed=seed)


def build(config: Config, num_ways: int, embedding_dim: int,
          dtype="float32") -> Hallucination:
  """Validates `config` and builds the learner (and its base learner)."""
  return Hallucination(config, num_ways, embedding_dim, dtype=tf.as_dtype(dtype))


SPEC = base.LearnerSpec(
    name="hallucination", build=build, config_class=Config,
    # ProtoNets' outer loop (the paper's PN / PMN are meta-trained end to end with
    # the generator): Adam 1e-3, no clipping. Fields of
    # leo_suite.training.optim.OuterConfig.
    outer_defaults=dict(learning_rate=1e-3, clip_value=0.0, clip_norm=0.0),
    # --jit_compile=auto compiles this learner's step with XLA (on one device the
    # whole step): XLA/plain steps/s 1.21 / 1.11 at 1 / 5 shots (scripts/benchmark.py,
    # runs/benchmark.json).
    xla_default=True,
)
