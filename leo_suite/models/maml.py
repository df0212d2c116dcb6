"""MAML (Finn et al., ICML 2017) and Meta-SGD (Li et al., 2017) on embeddings.

A linear softmax head (or an MLP head) over pre-computed embeddings; its
initialisation theta is meta-learned. For every task of a meta-batch the
inner loop (Finn et al., Eq. 1, applied T times) is

    theta'_0 = theta,   theta'_{t+1} = theta'_t - alpha o grad L_support(theta'_t)

and the meta-loss is the query cross-entropy at theta'_T (Eq. 3), averaged
over tasks. `alpha` is one fixed scalar (MAML) or, with `meta_sgd`, a learned
tensor of the same shape as each parameter, initialised to `inner_lr` (the
LEO paper's Table 3 "Meta-SGD (our features)" baseline). Meta-gradients are
second order (the outer tape differentiates through the inner gradients)
unless `first_order`, which applies stop_gradient to every inner gradient.

Loss-scale convention: L_support of a task is the MEAN softmax cross-entropy
over its N*K support examples (as learn2learn and the L2F/MAML++ code). The
reference cbfinn/maml divides the *summed* cross-entropy by K, i.e. uses
N x mean, whose gradient is N times ours, so alpha here equals N times its
alpha (its Omniglot 5-way alpha = 0.4 would be 2.0 here). On unit-norm 640-d
embeddings one step changes a logit by about alpha * (cosine) * (y - p) /
(N*K), so alpha must be O(1), much larger than the conv-net values; the
default 1.0 reflects that.

Head initialisation (`head_init`, see heads.py): the output layer starts at
zero by default, the slot-symmetric head from which one inner step is a
centred class-mean classifier (Omniglot 5w1s, 300 steps: 95.1% vs 92.5% with
Glorot; NCM 95.4%). The per-class inner step shrinks as 1/N with a mean
loss: for N-way use inner_lr ~ N/5 (20-way: 4.0; 1.0 drifts to 79%).

The inner loop is vectorised over tasks: fast weights carry a leading task
axis [B, ...] (`heads.HeadParams.tiled`), the loss summed over tasks of the
per-task means gives each task exactly its own gradient.
"""

import dataclasses
from typing import Callable, ClassVar, List, Optional, Sequence, Union

import tensorflow as tf

from leo_suite import errors
from leo_suite.models import adaptation
from leo_suite.models import base
from leo_suite.models import heads
from leo_suite.models import transforms


@dataclasses.dataclass(frozen=True)
class Config(heads.HeadConfig):
  """MAML / Meta-SGD hyperparameters (flags --maml_<field>)."""
  flag_prefix: ClassVar[str] = "maml_"
  eval_inner_steps: int = base.option(
      10, "Inner gradient steps per task at evaluation (the MAML paper "
              "tests with 10); inner_steps is T during meta-training "
              "(cbfinn/maml miniImageNet: 5).")
  first_order: bool = base.option(False, "First-order MAML: stop_gradient on the inner gradients "
              "(cbfinn/maml --stop_grad). Default: exact second order.")
  meta_sgd: bool = base.option(False, "Meta-SGD: learn a per-parameter step size alpha (same shape "
              "as each parameter of theta), initialised to inner_lr.")

  def validate(self):
    super().validate()
    if self.eval_inner_steps < 0:
      raise errors.ConfigError(
          f"--{self.flag_prefix}eval_inner_steps={self.eval_inner_steps}: must be >= 0")


LossFn = Callable[[List[tf.Tensor]], tf.Tensor]
GradFn = Callable[[List[tf.Tensor]], List[tf.Tensor]]


def inner_loop(loss_fn: LossFn, params: Sequence[tf.Tensor],
               lrs: Union[float, tf.Tensor, Sequence], steps: int,
               first_order: bool = False,
               gradient_fn: Optional[GradFn] = None) -> List[tf.Tensor]:
  """`steps` gradient steps theta <- theta - lr o grad loss_fn(theta).

  Pure function of its arguments (Finn et al., Eq. 1 iterated), so it applies
  to a quadratic as well as to a head. `lrs` is one scalar for every
  parameter or a list with one entry per parameter (scalar or a tensor that
  broadcasts against it, e.g. Meta-SGD's per-element rates). With
  `first_order` the inner gradients are constants for any outer tape, so
  d theta'/d theta = I (first-order MAML); otherwise an outer tape sees the
  full second-order path. `steps` is a Python int: the loop is unrolled.
  `gradient_fn(params)`, if given, must return the gradients of `loss_fn`
  (e.g. a closed form, cheaper to differentiate than a nested tape).
  """
  params = list(params)
  if not isinstance(lrs, (list, tuple)):
    lrs = [lrs] * len(params)
  if len(lrs) != len(params):
    raise ValueError(f"got {len(lrs)} learning rates for {len(params)} params")
  if gradient_fn is None:
    gradients = lambda fast_weights, step: adaptation.loss_gradients(loss_fn, fast_weights)[1]
  else:
    gradients = lambda fast_weights, step: gradient_fn(fast_weights)
  return adaptation.adapt_loop(gradients, params, transforms.scale_by_rates(lrs), steps,
                          first_order=first_order)


class MAML(heads.HeadLearner):
  """MAML / Meta-SGD with a functional linear or MLP head."""

  def __init__(self, config: Config, num_ways: int, embedding_dim: int,
               dtype=tf.float32, name="maml"):
    super().__init__(config, num_ways, embedding_dim, dtype, name=name)
    self.inner_lrs = None
    if config.meta_sgd:
      self.inner_lrs = [
          tf.Variable(tf.fill(p.shape, tf.constant(config.inner_lr, self.dtype)),
                      name="inner_lr_" + p.name.split(":")[0].split("/")[-1])
          for p in self.head.params]

  def inner_rates(self):
    """alpha per parameter: learned tensors (Meta-SGD) or the fixed scalar."""
    if self.inner_lrs is not None:
      return list(self.inner_lrs)
    return [tf.constant(self.config.inner_lr, self.dtype)] * len(self.head.params)

  def adapt(self, support_x, support_y, *, training, seed):
    """Fast weights theta'_T [B, ...] after the inner loop (no randomness)."""
    del seed
    self.check_episode_shape(support_x)
    steps = self.config.inner_steps if training else self.config.eval_inner_steps
    if len(self.head.params) == 2 and self.inner_lrs is None:
      # A linear head with scalar step sizes: the same steps on the support
      # logits: XLA meta-training 237 -> 360 steps/s at 1-shot (docs/benchmarks.md).
      return adaptation.linear_inner_loop(self.initial_fast_weights(support_x, support_y),
                                     self.cast(support_x), support_y, self.inner_rates(),
                                     steps, self.config.first_order)
    return inner_loop(self.support_loss_fn(support_x, support_y),
                      self.initial_fast_weights(support_x, support_y),
                      self.inner_rates(), steps, self.config.first_order,
                      self.support_gradient_fn(support_x, support_y))


def build(config: Config, num_ways: int, embedding_dim: int, dtype="float32"):
  return MAML(config, num_ways, embedding_dim, dtype=dtype)


SPEC = base.LearnerSpec(
    name="maml", build=build, config_class=Config,
    # The reference's outer loop (cbfinn/maml): Adam at meta_lr 1e-3; its only
    # clipping is by value to +-10 (miniImageNet); TF1 Adam epsilon 1e-8. Fields
    # of leo_suite.training.optim.OuterConfig (the rest keep its defaults).
    outer_defaults=dict(learning_rate=1e-3, clip_value=10.0, clip_norm=0.0),
    # --jit_compile=auto compiles this learner's step with XLA (on one device the
    # whole step): XLA/plain steps/s 1.36 / 1.11 at 1 / 5 shots (scripts/benchmark.py,
    # runs/benchmark.json).
    xla_default=True,
    eval_fields=("eval_inner_steps",),
)
