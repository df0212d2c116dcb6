"""LEO: Meta-Learning with Latent Embedding Optimization (Rusu et al., ICLR 2019).

A faithful Sonnet 2 port of DeepMind's release (model.py), vectorised over the
tasks of a meta-batch. Notation follows the paper: inputs x [B, N, K, D],
latent codes z [B, N, K, d_z], classifier weights w [B, N, K, D].

Release behaviours kept on purpose (each checked in tests/test_leo.py):
- encoder = dropout then a bias-free linear D -> d_z (paper eq. 3's g_phi_e);
- relation net over all (NK)^2 ordered pairs of codes, self-pairs included,
  averaged over all NK partners, then over the K examples of each class
  (eq. 4); std = max(exp(u) - 1, 1e-10), not softplus;
- one latent sample per (class, shot) in meta-training, the mean otherwise; KL
  is the single-sample *mean* of log q(z) - log N(z; 0, I);
- decoder: bias-free d_z -> 2D with std offset sqrt(2 / (D + N)) (eq. 5);
- logits[n, k, c] = mean_k' <dropout(x[n, k]), w[c, k']>, dropout redrawn at
  every loss evaluation in meta-training (support and query); its
  Bernoulli(1 - rate) masks come from random bits, 1 per entry at rate 0.5
  (models/draws.py);
- latent loop z <- z - alpha * grad_z sum(CE) (the SUM of per-example losses,
  eq. 6), alpha of shape [1, 1, d_z]; fine-tuning w <- w - eta * grad_w sum(CE),
  eta of shape [1, 1, D] (eq. 7); both second-order;
- encoder penalty MSE(z_0, stop_gradient(z_T)) in meta-training only; L2
  lambda_1 * sum(w^2) / 2 on encoder, relation and decoder weights only;
  orthogonality penalty mean((C - I)^2) on the decoder's rows (eq. 8).
The release's NaN guard (it zips its lists the wrong way round and so feeds
the *variables* to Adam as the fallback gradient) is the trainer's
`--nan_guard=release`; the default skips a non-finite step entirely
(leo_suite/training/optim.py).

The first relation-network layer acts on concatenated pairs [h_i, h_j]; it is
computed as W_a h_i + W_b h_j (same weights, same result) so the (NK)^2 pair
tensor is formed after the first matmul, not before it; the last (linear)
layer is applied after the means over partners and shots.
"""

import dataclasses
import math
from typing import ClassVar

import tensorflow as tf

from leo_suite import errors
from leo_suite.models import adaptation
from leo_suite.models import base
from leo_suite.models import draws


@dataclasses.dataclass(frozen=True)
class Config:
  flag_prefix: ClassVar[str] = ""  # LEO keeps the release's flag names.
  inner_unroll_length: int = base.option(
      5, "T_z: latent-space adaptation steps z <- z - alpha grad_z L_tr (eq. 6).")
  finetuning_unroll_length: int = base.option(
      5, "T_w: fine-tuning steps on the decoded weights w <- w - eta grad_w L_tr (eq. 7).")
  num_latents: int = base.option(64, "d_z: size of the latent code z per (class, shot).")
  inner_lr_init: float = base.option(
      1.0, "Initial alpha, the learned latent step size, shape [1, 1, d_z].")
  finetuning_lr_init: float = base.option(
      0.001, "Initial eta, the learned fine-tuning step size, shape [1, 1, D].")
  dropout_rate: float = base.option(
      0.5, "Dropout on the inputs x of the encoder and the classifier (meta-training only).")
  kl_weight: float = base.option(1e-3, "beta: weight of the KL(q(z|D_tr) || N(0, I)) term (eq. 8).")
  encoder_penalty_weight: float = base.option(
      1e-9, "gamma: weight of ||stopgrad(z_T) - z_0||^2 (eq. 8).")
  l2_penalty_weight: float = base.option(
      1e-8, "lambda_1: weight of sum(w^2)/2 over encoder, relation and decoder weights.")
  orthogonality_penalty_weight: float = base.option(
      1e-3, "lambda_2: weight of the decoder row-orthogonality penalty Omega (eq. 8).")

  def validate(self):
    """Raises ConfigError naming the flag for a value the release cannot run with."""
    for name in ("inner_unroll_length", "num_latents"):
      if getattr(self, name) < 1:
        raise errors.ConfigError(
            f"--{name}={getattr(self, name)}: must be >= 1 (the release asserts it)")
    if self.finetuning_unroll_length < 0:
      raise errors.ConfigError(
          f"--finetuning_unroll_length={self.finetuning_unroll_length}: must be >= 0")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise errors.ConfigError(f"--dropout_rate={self.dropout_rate}: must be in [0, 1)")
    for name in ("kl_weight", "encoder_penalty_weight", "l2_penalty_weight",
                 "orthogonality_penalty_weight"):
      if not getattr(self, name) >= 0:
        raise errors.ConfigError(f"--{name}={getattr(self, name)}: must be >= 0")


def build(config, num_ways, embedding_dim, dtype="float32"):
  config.validate()
  return LEO(config, num_ways, embedding_dim, dtype)


def gradient_descent(start, loss_fn, learning_rate, num_steps):
  """x <- x - lr * grad_x sum(loss_fn(x)), `num_steps` times (eq. 6 and 7).

  The gradient is of the SUM of the per-example losses, as the release's
  tf.gradients on a non-scalar loss. Inner tapes are recorded by any outer
  tape, so the result is differentiable to second order.
  """
  x = start
  for _ in range(num_steps):
    with tf.GradientTape() as tape:
      tape.watch(x)
      loss = tf.reduce_sum(loss_fn(x))
    x = x - learning_rate * tape.gradient(loss, x)
  return x


def stddev(raw_std, std_offset):
  """The release's std = max(exp(u) - (1 - offset), 1e-10) (not softplus)."""
  return tf.maximum(tf.exp(raw_std) - (1.0 - std_offset), 1e-10)


def _sample_normal(means, raw_std, std_offset, training, seed):
  """Release's possibly_sample: (sample or mean, mean KL to N(0, I) per task).

  std = max(exp(u) - (1 - std_offset), 1e-10). KL is the single-sample
  estimate reduce_mean(log q(s) - log N(s; 0, 1)), one value per task [B].
  """
  if not training:
    return means, tf.zeros(tf.shape(means)[:1], means.dtype)
  std = stddev(raw_std, std_offset)
  noise = base.random_draw("normal", tf.shape(means), seed, means.dtype)
  samples = means + std * noise
  # log N(s; m, std) - log N(s; 0, 1); the log(2 pi)/2 terms cancel.
  log_ratio = -0.5 * tf.square(noise) - tf.math.log(std) + 0.5 * tf.square(samples)
  return samples, tf.reduce_mean(log_ratio, axis=[1, 2, 3])


class LEO(base.Learner):
  """LEO over a meta-batch; meta-parameters are explicit tf.Variables."""

  # A 5-shot step of 12 tasks (300 support examples) in three compiled calls
  # of 4 tasks side by side: 231-288 tasks/s against 157-192 as one call
  # (experiments/leo_parts_probe.py, docs/benchmarks.md). A one-shot step
  # (60 examples) stays one call: parts did not help it.
  training_step_examples = 100

  def __init__(self, config: Config, num_ways, embedding_dim, dtype="float32",
               name="leo"):
    super().__init__(num_ways, embedding_dim, dtype, name=name)
    config.validate()
    self.config = config
    d, latents = self.embedding_dim, config.num_latents
    with tf.name_scope("encoder"):
      self.encoder_w = tf.Variable(base.glorot_uniform([d, latents], self.dtype), name="w")
    with tf.name_scope("relation_network"):
      self.relation_ws = [
          tf.Variable(base.glorot_uniform([2 * latents, 2 * latents], self.dtype), name=f"w_{i}")
          for i in range(3)]
    with tf.name_scope("decoder"):
      self.decoder_w = tf.Variable(base.glorot_uniform([latents, 2 * d], self.dtype), name="w")
    with tf.name_scope("leo_inner"):
      self.inner_lr = tf.Variable(
          tf.fill([1, 1, latents], tf.constant(config.inner_lr_init, self.dtype)),
          name="lr")
    with tf.name_scope("finetuning"):
      self.finetuning_lr = tf.Variable(
          tf.fill([1, 1, d], tf.constant(config.finetuning_lr_init, self.dtype)),
          name="lr")
    self._num_shots = None

  # -- pieces of the model --------------------------------------------------
  @property
  def regularised_weights(self):
    return [self.encoder_w] + self.relation_ws + [self.decoder_w]

  def _dropout(self, x, training, seed):
    if not training or self.config.dropout_rate == 0:
      return x
    return draws.dropout(x, self.config.dropout_rate, seed)

  def encode(self, support_x, training, seeds):
    """Returns the latent mean/raw-std parameters [B, N, K, 2 d_z]."""
    # base.dense (tensordot), not einsum("bnkd,dl->bnkl"): the einsum's
    # gradient took 2.1-2.4x as long for these shapes (the encoder's and
    # decoder's products, measured on this CPU), and the inner loop
    # differentiates the decoder ten times per step.
    codes = base.dense(self._dropout(support_x, training, seeds()), self.encoder_w)
    shape = tf.shape(codes)
    b, n, k = shape[0], shape[1], shape[2]
    flat = tf.reshape(codes, [b, n * k, self.config.num_latents])     # h_i
    w_first = self.relation_ws[0]
    left = base.dense(flat, w_first[:self.config.num_latents])
    right = base.dense(flat, w_first[self.config.num_latents:])
    pairs = tf.nn.relu(left[:, :, tf.newaxis] + right[:, tf.newaxis])  # [B, NK, NK, 2d_z]
    pairs = tf.nn.relu(base.dense(pairs, self.relation_ws[1]))
    # The last layer is linear, so it follows both means (over all NK
    # partners, then over K): one product per class instead of one per pair,
    # a third of the relation network's multiply-adds.
    per_example = tf.reduce_mean(pairs, axis=2)                       # over all NK partners
    per_example = tf.reshape(per_example, [b, n, k, 2 * self.config.num_latents])
    per_class = tf.reduce_mean(per_example, axis=2, keepdims=True)   # over K
    return tf.tile(base.dense(per_class, self.relation_ws[2]), [1, 1, k, 1])

  def decode(self, latents, training, seed):
    """Classifier weights w [B, N, K, D] (sampled in meta-training)."""
    params = base.dense(latents, self.decoder_w)
    means, raw_std = tf.split(params, 2, axis=-1)
    offset = math.sqrt(2.0 / (self.embedding_dim + self.num_ways))
    weights, _ = _sample_normal(means, raw_std, offset, training, seed)
    return weights

  def logits(self, x, weights, training, seed):
    """logits[b, n, k, c] = mean_k' <dropout(x[b, n, k]), w[b, c, k']>."""
    return tf.einsum("bnkd,bcd->bnkc", self._dropout(x, training, seed),
                     tf.reduce_mean(weights, axis=2))

  def _support_loss(self, x, y, weights, training, seed):
    """Per-example cross-entropy [B, N, K] of the classifier `weights`."""
    return base.cross_entropy(self.logits(x, weights, training, seed), y)

  def _check_shape(self, support_x):
    self.check_episode_shape(support_x)
    k = support_x.shape[2]
    if self._num_shots is None:
      self._num_shots = k
    elif k != self._num_shots:
      raise ValueError(
          f"LEO was first called with K = {self._num_shots} examples per class "
          f"and now with K = {k}; build a new model for a different K")

  # -- adaptation (eq. 6 and 7) ---------------------------------------------
  def _adapt(self, support_x, support_y, training, seeds):
    """Returns (fine-tuned w [B, N, K, D], latent KL [B], encoder penalty [B])."""
    self._check_shape(support_x)
    latent_params = self.encode(support_x, training, seeds)
    means, raw_std = tf.split(latent_params, 2, axis=-1)
    z0, kl = _sample_normal(means, raw_std, 0.0, training, seeds())
    support_loss = lambda w: self._support_loss(support_x, support_y, w, training, seeds())
    z = gradient_descent(z0, lambda z: support_loss(self.decode(z, training, seeds())),
                         self.inner_lr, self.config.inner_unroll_length)
    if training:
      penalty = tf.reduce_mean(tf.square(z0 - tf.stop_gradient(z)), axis=[1, 2, 3])
    else:
      penalty = tf.zeros_like(kl)
    weights = gradient_descent(self.decode(z, training, seeds()), support_loss,
                               self.finetuning_lr, self.config.finetuning_unroll_length)
    return weights, kl, penalty

  def _adapt_evaluation(self, support_x, support_y):
    """Evaluation's adaptation (no samples, no dropout) on the support logits.

    Without sampling every shot of a class has the same code z_c (the
    encoder tiles the class mean) and decoded weights w_c = z_c W_mu, so the
    logits are S = X w^T = P z^T with P = X W_mu^T [B, M, d_z] (M = NK
    support rows). The gradient of the summed cross-entropy is
    (1/K) Delta^T P for each z_c (eq. 6; Delta = softmax(S) - Y) and
    (1/K) Delta^T X for each w_c (eq. 7), so a latent step moves S by
    -(1/K) (P o alpha) P^T Delta and a fine-tuning step by
    -(1/K) (X o eta) X^T Delta: both loops run on [B, M, N] logits with an
    M x M kernel, and the adapted classifier is read off at the end. The
    same result as the explicit loops of `_adapt` (tests), which decode
    [B, N, K, 2D] weights at every latent step. Returns w [B, N, D].
    """
    self._check_shape(support_x)
    x = tf.cast(support_x, self.dtype)
    num_tasks, num_shots = tf.shape(x)[0], x.shape[2]
    means, _ = tf.split(self.encode(x, False, lambda: None), 2, axis=-1)
    codes = means[:, :, 0]                                            # z_c [B, N, d_z]
    rows = tf.reshape(x, [num_tasks, -1, self.embedding_dim])          # X [B, M, D]
    one_hot = tf.one_hot(tf.reshape(support_y, [num_tasks, -1]), self.num_ways,
                         dtype=self.dtype)
    decoder_means = self.decoder_w[:, :self.embedding_dim]             # W_mu [d_z, D]
    projected = tf.matmul(rows, decoder_means, transpose_b=True)      # P [B, M, d_z]

    def descend(features, rates, classifier, steps):
      """The classifier [B, N, F] after `steps` steps on logits features classifier^T."""
      total = adaptation.logit_steps_total(
          tf.matmul(features, classifier, transpose_b=True),
          tf.matmul(features * rates, features, transpose_b=True) / num_shots, one_hot, steps)
      return classifier - rates * tf.matmul(total, features, transpose_a=True) / num_shots

    codes = descend(projected, self.inner_lr[0], codes, self.config.inner_unroll_length)
    return descend(rows, self.finetuning_lr[0], base.dense(codes, decoder_means),
                   self.config.finetuning_unroll_length)

  def adapt(self, support_x, support_y, *, training, seed):
    """State: the fine-tuned classifier averaged over shots, [B, N, D]."""
    if not training:
      return self._adapt_evaluation(support_x, support_y)
    weights, _, _ = self._adapt(support_x, support_y, training, base.SeedStream(seed))
    return tf.reduce_mean(weights, axis=2)

  def predict(self, state, query_x, *, training, seed):
    return tf.einsum("bnkd,bcd->bnkc", self._dropout(query_x, training, seed), state)

  def readout(self, state):
    """The adapted weights w_n [B, N, D] score x by x . w_n (no bias)."""
    return base.Readout(lambda x: tf.cast(x, self.dtype), state, None)

  # -- meta-objective (eq. 8) -------------------------------------------------
  def l2_penalty(self):
    return self.config.l2_penalty_weight * tf.add_n(
        [tf.reduce_sum(tf.square(w)) for w in self.regularised_weights]) / 2

  def orthogonality_penalty(self):
    w = self.decoder_w                                 # rows: one per latent
    norms = tf.norm(w, axis=1, keepdims=True) + 1e-32
    cosine = tf.matmul(w, w, transpose_b=True) / tf.matmul(norms, norms, transpose_b=True)
    identity = tf.eye(tf.shape(w)[0], dtype=w.dtype)
    return self.config.orthogonality_penalty_weight * tf.reduce_mean(
        tf.square(cosine - identity))

  def regularization(self):
    return self.l2_penalty() + self.orthogonality_penalty()

  def meta_loss(self, episode, *, training, seed):
    seeds = base.SeedStream(seed)
    weights, kl, penalty = self._adapt(episode.support_x, episode.support_y,
                                       training, seeds)
    logits = self.logits(episode.query_x, weights, training, seeds())
    query_loss = tf.reduce_mean(base.cross_entropy(logits, episode.query_y))
    kl, penalty = tf.reduce_mean(kl), tf.reduce_mean(penalty)
    loss = (query_loss + self.config.kl_weight * kl +
            self.config.encoder_penalty_weight * penalty + self.regularization())
    return loss, {"query_loss": query_loss, "kl": kl, "encoder_penalty": penalty,
                  "accuracy": tf.reduce_mean(base.accuracy(logits, episode.query_y))}


SPEC = base.LearnerSpec(
    name="leo", build=build, config_class=Config,
    # The release's outer loop: clip by value 0.1, then each tensor to norm 0.1,
    # then Adam(1e-4, TF1 epsilon 1e-8): leo_suite.training.optim.OuterConfig's
    # defaults.
    outer_defaults={},
    # --jit_compile=auto compiles this learner's step with XLA (on one device the
    # whole step), its dropout masks and samples drawn outside XLA
    # (training/xla.py's Predrawn): XLA/plain steps/s 1.19 / 1.17 at 1 / 5 shots
    # (scripts/benchmark.py --only=leo,r2d2,snail,hallucination
    # --skip=eval,memory,extraction,serving,map_fn on df5ce73; 0.69 / 0.76 on the
    # commit before, with the draws inside XLA).
    xla_default=True,
)
