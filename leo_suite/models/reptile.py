"""Reptile (Nichol, Achiam & Schulman, 2018, "On first-order meta-learning
algorithms") on embeddings: a linear or MLP head theta adapted per task.

Inner loop (the paper's U^k, Algorithm 2): k steps of SGD (or Adam, flag
`inner_optimizer`) on each task's MEAN support cross-entropy from theta give
W_b = U^k_b(theta), every task of the meta-batch at once (fast weights with a
leading task axis, as MAML). The outer update (Algorithm 2, batched) is

    theta <- theta + epsilon * mean_b (W_b - theta).

No query loss enters it and nothing is differentiated through the inner loop
(`adapt` runs a `tf.while_loop` on stop_gradient-ed tensors). Evaluation with
SGD on an MLP head runs the loop on the support rows' first-layer
pre-activations (adaptation.span_sgd_loop: W_1 stays theta_W1 + X^T C, so a
step costs O(M^2 H_1), not O(M D H_1), for M support rows; equal in exact
arithmetic) and scores query rows through that factored layer.

Through the shared trainer: `loss_and_gradients` returns the "gradient"
g = theta - mean_b W_b, and SPEC.outer_defaults is plain SGD at rate epsilon
without clipping, so the trainer's theta - epsilon * g is exactly Reptile's
update. Of the trainer's chain: the NaN guard applies (a non-finite W_b skips
the step); clipping (--gradient_threshold, --gradient_norm_threshold) only if
the user sets it, and then it clips the displacement; --outer_optimizer=adam
normalises the displacement per element, which is a different algorithm.
The reference anneals epsilon linearly from 1 to 0; here epsilon is constant
(default 1.0). The presets' --outer_lr values are Adam rates and are not
applied to an SGD outer loop (config.apply_preset), so --preset=demo keeps
epsilon. The returned loss (logged, NaN-guarded, never differentiated) is the
query cross-entropy at W_b. With train_on_query (the default) W_b was fitted
on those very queries, so that loss and the accuracy beside it measure the
fit, not generalisation: the trainer prints the accuracy as "support-fit
accuracy" (`train_accuracy_label`); validation is the held-out measure.

Analysis (paper Sec. 5): for k = 1 SGD step g = alpha grad L(theta) (joint
training); on a quadratic L = 1/2 (x - a)^T A (x - a) one step gives
W = theta - alpha A (theta - a), so g = alpha A (theta - a)
(tests/test_reptile.py checks both).

Reference (openai/supervised-reptile) details and what carries over:
  * meta-training tasks hold 15 shots per class whatever the test shot (its
    1-shot miniImageNet runs train on 15): the inner loop fits more than the
    test support. Here (train_on_query) the meta-training inner loop fits the
    episode's support AND query examples (K + V per class). This is what
    makes Reptile learn on 1-shot tasks: it never sees a held-out loss, and
    fitting one example per class cannot tell the class signal from
    within-class nuisance (support only: 43.8% on synthetic vs NCM 49.9%);
  * inner Adam with beta1 = 0 and lr 1e-3 on a conv net, 5 (Omniglot) or 8
    (miniImageNet) inner steps on mini-batches of 10, 50 steps at test. Here
    the default inner optimizer is SGD at alpha = 1.0 on the mean
    cross-entropy as MAML here (from the zero output layer one SGD step is
    the centred class-mean classifier, see heads.py; Adam's first step is
    ~alpha * sign(g), a sign classifier), on all the task's examples
    (inner_batch_size = 0; mini-batches are drawn afresh each step, not in
    epochs as the reference);
  * Adam's moments persist across meta-training tasks in the reference (only
    the weights are reset). Not reproduced: each task's inner Adam starts
    from zero moments, so a step stays a pure function of (theta, episode)
    and replicas of a distributed step cannot diverge;
  * batch norm with batch statistics and `--transductive` evaluation: there
    is no batch norm on embeddings, so transductive and non-transductive
    evaluation coincide.

Defaults, first compared on synthetic (5-way 1-shot, 300 steps of --preset=demo,
500 of the test tasks, so not a choice to rely on; the validation-only re-check
is in docs/results.md; NCM 49.9%; every row with train_on_query): linear head 48.1%
(the slot-symmetric W cannot hold the shared subspace); 64-unit MLP head
63.1% (alpha 1.0), 69.0% (alpha 3.0; alpha 5.0 kills the ReLU layer: 21%),
74.0% after 1500 steps; 256 units 71.4% / 70.4% (two seeds) at alpha 1.0,
the default: on 16-d toy features (tests/test_maml.py) the 64-unit head at
alpha 3.0 falls to 28% before any training (a narrow input gives larger
hidden features, so the same alpha is a larger step), the 256-unit one at
alpha 1.0 stays at 99%. Other settings at 300 steps (64 units, alpha 3):
epsilon 0.1 50.8%, epsilon 2.0 diverges; k = 4 59.3%; inner_batch_size 10
50.3%, 25 67.1%; eval_inner_steps 8 / 20 / 100: 71.8 / 73.0 / 74.7% (1500
steps); Adam inner loop (lr 0.003 / 0.01 / 0.03): 49.3 / 49.2 / 52.8%.
"""

import dataclasses
from typing import Callable, ClassVar, List, Sequence

import tensorflow as tf

from leo_suite.data.episodes import Episode
from leo_suite.models import adaptation
from leo_suite.models import base
from leo_suite.models import heads
from leo_suite.models import transforms

INNER_OPTIMIZERS = ("sgd", "adam")
ADAM_EPSILON = 1e-8  # TF1 AdamOptimizer's default, as the reference


@dataclasses.dataclass(frozen=True)
class Config(heads.HeadConfig):
  """Reptile hyper-parameters (flags --reptile_<field>)."""
  flag_prefix: ClassVar[str] = "reptile_"
  inner_steps: int = base.option(
      8, "k, the inner optimizer steps per task during meta-training "
         "(supervised-reptile: 5 Omniglot, 8 miniImageNet).")
  eval_inner_steps: int = base.option(
      50, "Inner optimizer steps per task at evaluation (supervised-reptile "
          "tests with 50).")
  hidden_sizes: str = base.option(
      "256", "Hidden layer widths of the head, comma separated ('' = linear "
             "head). A linear head cannot beat nearest-class-mean on synthetic "
             "(its slot-symmetric W cannot hold a projection); an MLP learns "
             "the shared subspace (see the module docstring).")
  inner_lr: float = base.option(
      1.0, "alpha, the inner SGD step size on the MEAN cross-entropy (for "
           "inner_optimizer=adam use ~1e-3 to 3e-2; the reference: 1e-3).")
  inner_optimizer: str = base.option(
      "sgd", "Inner optimizer: 'sgd' (default on embeddings) or 'adam' (the "
             "reference; per task, moments start at zero for every task).")
  inner_beta1: float = base.option(
      0.0, "Adam's beta1 of the inner optimizer (reference: 0, 'momentum "
           "hurt').")
  inner_beta2: float = base.option(0.999, "Adam's beta2 of the inner optimizer.")
  inner_batch_size: int = base.option(
      0, "Meta-training only: examples per task drawn (without replacement, "
         "afresh each step) for each inner step; 0 = all of them "
         "(supervised-reptile: 10 for 5-way). Evaluation always uses the "
         "whole support set.")
  train_on_query: bool = base.option(
      True, "Meta-training only: the inner loop trains on the episode's "
            "support AND query examples (K + V per class), as the reference "
            "meta-trains on 15 shots per class whatever the test shot.")

  def validate(self):
    """Raises ConfigError naming the flag if a value is out of range."""
    super().validate()
    if self.eval_inner_steps < 0:
      self.refuse("eval_inner_steps", "must be >= 0")
    if self.inner_optimizer not in INNER_OPTIMIZERS:
      self.refuse("inner_optimizer", f"choose one of {', '.join(INNER_OPTIMIZERS)}")
    if self.inner_batch_size < 0:
      self.refuse("inner_batch_size", "must be >= 0 (0 = all of the task's examples)")
    for field in ("inner_beta1", "inner_beta2"):
      if not 0.0 <= getattr(self, field) < 1.0:
        self.refuse(field, "must be in [0, 1)")


GradFn = Callable[[List[tf.Tensor], tf.Tensor], List[tf.Tensor]]


def inner_loop(gradient_fn: GradFn, params: Sequence[tf.Tensor], *, steps,
               learning_rate: float, optimizer: str = "sgd", beta1: float = 0.0,
               beta2: float = 0.999) -> List[tf.Tensor]:
  """U^k: `steps` steps of SGD or Adam from `params`, with no gradient path.

  sgd:  p <- p - lr g.
  adam: TF1's Adam from zero moments: t <- t + 1, m <- b1 m + (1 - b1) g,
        v <- b2 v + (1 - b2) g^2, p <- p - lr sqrt(1 - b2^t) / (1 - b1^t)
        m / (sqrt(v) + 1e-8), element-wise (so per task for [B, ...] params).
  gradient_fn(params, step) -> gradients of the loss at params (a list like
  params); `step` (int32 scalar tensor) lets it draw a mini-batch per step.
  adaptation.adapt_loop with transforms.sgd / transforms.adam: a tf.while_loop,
  the graph is the same for any `steps` (eval runs 50).
  """
  if optimizer not in INNER_OPTIMIZERS:
    raise ValueError(f"unknown inner optimizer {optimizer!r}; choose from {INNER_OPTIMIZERS}")
  update = (transforms.sgd(learning_rate) if optimizer == "sgd" else
            transforms.adam(learning_rate, beta1, beta2, epsilon=ADAM_EPSILON))
  return adaptation.adapt_loop(gradient_fn, params, update, steps, differentiable=False)


def minibatch_gradient_fn(inputs, labels, batch_size: int, seed) -> GradFn:
  """(params, step) -> mean-CE gradients on `batch_size` examples per task.

  inputs [B, ..., D], labels [B, ...]; each step draws, for every task on its
  own, batch_size of its M examples without replacement (all M if M <=
  batch_size), from a stateless seed folded with the step.
  """
  num_tasks = tf.shape(inputs)[0]
  inputs = tf.reshape(inputs, [num_tasks, -1, tf.shape(inputs)[-1]])  # [B, M, D]
  labels = tf.reshape(labels, [num_tasks, -1])  # [B, M]
  seed = tf.cast(seed, tf.int32)

  def gradient_fn(params, step):
    keys = tf.random.stateless_uniform(  # (XLA draws other numbers than eager)
        tf.shape(labels), tf.random.experimental.stateless_fold_in(seed, step))
    chosen = tf.argsort(keys, axis=1)[:, :batch_size]
    return heads.head_cross_entropy_gradients(
        params, tf.gather(inputs, chosen, batch_dims=1),
        tf.gather(labels, chosen, batch_dims=1))
  return gradient_fn


def reptile_gradient(start: Sequence[tf.Tensor], adapted: Sequence[tf.Tensor]):
  """g = mean_b (start_b - W_b) per parameter (both [B, ...]): theta - mean_b W_b
  when every task starts at theta; under head_init='proto' each task starts at
  theta plus its prototypes (first order, as fo-Proto-MAML)."""
  return [tf.reduce_mean(s - w, axis=0) for s, w in zip(start, adapted)]


class Reptile(heads.HeadLearner):
  """Reptile over a linear or MLP head on embeddings (see module docstring)."""

  def __init__(self, config: Config, num_ways: int, embedding_dim: int,
               dtype=tf.float32, name="reptile"):
    super().__init__(config, num_ways, embedding_dim, dtype=dtype, name=name)
    # What the meta-training accuracy measures (the trainer's log label).
    self.train_accuracy_label = ("support-fit accuracy" if config.train_on_query
                                 else "train_acc")

  def adapt(self, support_x, support_y, *, training, seed):
    """W_b = U^k_b(theta) per task (k = inner_steps, eval_inner_steps at test).

    Evaluation uses the whole support set at every step (deterministic);
    meta-training draws mini-batches of inner_batch_size from `seed`.
    """
    self.check_episode_shape(support_x)
    config = self.config
    if not training and self.spans_first_layer():
      return self.readout_state(support_x, support_y, seed=seed).dense(self.head.params[0])
    if training and config.inner_batch_size:
      gradient_fn = minibatch_gradient_fn(self.cast(support_x), support_y,
                                          config.inner_batch_size, seed)
    else:
      full_batch = self.support_gradient_fn(support_x, support_y)
      gradient_fn = lambda params, step: full_batch(params)
    return inner_loop(gradient_fn,
                      self.initial_fast_weights(support_x, support_y),
                      steps=config.inner_steps if training else config.eval_inner_steps,
                      learning_rate=config.inner_lr, optimizer=config.inner_optimizer,
                      beta1=config.inner_beta1, beta2=config.inner_beta2)

  def spans_first_layer(self) -> bool:
    """Whether evaluation adapts the first layer in the span of the support
    rows (adaptation.span_sgd_loop): SGD on an MLP head."""
    return self.config.inner_optimizer == "sgd" and len(self.head.params) > 2

  def readout_state(self, support_x, support_y, *, seed):
    """W_b = U^k_b(theta) at evaluation, as a heads.SpanHead under SGD on an
    MLP head (scoring V query rows then costs O(V D M) per task, not
    O(V D H_1)); `adapt`'s fast weights otherwise."""
    if not self.spans_first_layer():
      return super().readout_state(support_x, support_y, seed=seed)
    self.check_episode_shape(support_x)
    return adaptation.span_sgd_loop(
        self.head.params[0], self.initial_fast_weights(support_x, support_y),
        self.cast(support_x), support_y, self.config.inner_lr, self.config.eval_inner_steps)

  def loss_and_gradients(self, episode: Episode, *, seed):
    """(query loss at W, g = theta - mean_b W_b for the trainer's SGD, metrics)."""
    if self.config.train_on_query:
      train_x = tf.concat([episode.support_x, episode.query_x], axis=2)
      train_y = tf.concat([episode.support_y, episode.query_y], axis=2)
    else:
      train_x, train_y = episode.support_x, episode.support_y
    adapted = self.adapt(train_x, train_y, training=True, seed=seed)
    logits = self.predict(adapted, episode.query_x, training=True, seed=seed)
    query_loss = tf.reduce_mean(base.cross_entropy(logits, episode.query_y))
    start = self.initial_fast_weights(train_x, train_y)
    by_param = {p.ref(): g for p, g in
                zip(self.head.params, reptile_gradient(start, adapted))}
    grads = [by_param[v.ref()] for v in self.trainable_variables]
    support_loss = self.support_losses_fn(train_x, train_y)(adapted)
    return query_loss, grads, {
        "query_loss": query_loss,
        "accuracy": tf.reduce_mean(base.accuracy(logits, episode.query_y)),
        "support_loss": tf.reduce_mean(support_loss)}


def build(config: Config, num_ways: int, embedding_dim: int, dtype="float32") -> Reptile:
  return Reptile(config, num_ways, embedding_dim, dtype=tf.as_dtype(dtype))


SPEC = base.LearnerSpec(
    name="reptile", build=build, config_class=Config,
    # The outer update theta - epsilon * (theta - mean W) is SGD at rate epsilon
    # on the returned "gradient"; no clipping (Reptile has none). Fields of
    # leo_suite.training.optim.OuterConfig. epsilon = 1.0 (the reference anneals
    # 1 -> 0; measured in the module docstring).
    outer_defaults=dict(optimizer="sgd", learning_rate=1.0, clip_value=0.0, clip_norm=0.0),
    eval_fields=("eval_inner_steps",),
    # Evaluation's table readout (a SpanHead's rows, then the hidden layer and
    # the output layer per task) with XLA: 1.4-1.8x per chunk of 16 tasks;
    # 2,000 tasks at 1-shot, scoring 1.74-2.21 s vs 5.56-5.57 s plain.
    xla_readout=True,
)
