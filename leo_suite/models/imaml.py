"""iMAML: meta-learning with implicit gradients (Rajeswaran et al., NeurIPS'19).

A linear or MLP softmax head theta (`HeadParams`) is adapted per task by the
proximal inner problem (paper Eq. 4)

    phi*(theta) = argmin_phi  L_S(phi) + lam/2 ||phi - theta||^2,

solved approximately by `inner_steps` gradient steps on fast weights with a
leading task axis. Stationarity, grad L_S(phi*) + lam (phi* - theta) = 0, gives
by the implicit function theorem (paper Lemma 1, Eq. 6)

    d phi*/d theta = (I + H/lam)^-1,   H = grad^2 L_S(phi*),

so the meta-gradient of the query loss L_Q(phi*) is v solving

    (I + H/lam) v = g,   g = grad_phi L_Q(phi*)                  (paper Eq. 7)

by conjugate gradient on Hessian-vector products (Algorithm 2). Nothing is
backpropagated through the inner steps: they run in a `tf.while_loop` on
`stop_gradient`-ed tensors, so memory does not grow with `inner_steps`; the
only second-order work is at phi* (one gradient tape, re-used by every HVP).

Everything is batched over the B tasks of a meta-batch: each task has its own
fast weights, its own H (the support loss is a sum of independent per-task
losses, so its Hessian is block-diagonal over tasks) and its own CG run (the
CG scalars alpha, beta are per task, shape [B]).

Two variants (`Config.variant`):
  "paper":     inner GD on L_S + lam/2||phi - theta||^2 from phi_0 = theta;
               CG on A v = v + H v / lam, i.e. exactly Eq. 7. `cg_damping`
               is not used. cg_steps = 0 gives the first-order v = g.
  "reference": what aravindr93/imaml_dev's Omniglot script does: plain SGD on
               L_S (no proximal term), then ONE pull-back step
               phi <- phi - inner_lr * lam * (phi - theta); CG on
               A v = (1 + cg_damping) v + H v / (lam + 10)  (its hard-coded
               lam_damping = 10), i.e. (2I + H/12) v = g with lam = 2 and
               cg_damping = 1. cg_steps <= 1 gives v = g, as there.
In both, CG starts from x_0 = 0 and stops a task once r.r < 1e-10; a task
whose operator turns out not positive along the search direction (possible
for an MLP head away from the optimum) keeps its current iterate.

Defaults on embeddings (measured; root cause of iMAML at chance on Omniglot):
phi* - theta = -grad L_S(phi*)/lam, and on unit-norm embeddings the mean-CE
gradient of a head is ~ (class-mean gap)/N, so with the paper's lam = 2 the
adapted head differs from theta by O(0.01) per logit. A Glorot output layer
gives each of the N (randomly assigned) slots O(0.2) random logits, which
swamp that: 24% on Omniglot 5w1s before and after 300 steps (chance 20%).
From a zero output layer iMAML starts at the class-mean baseline, but Adam's
slot-asymmetric noise on theta (~ outer_lr per step) outgrows the tiny
adaptation (95% -> 51% in 300 steps). Hence head_init = "zeros" and lam =
0.2 (1/lam = MAML's alpha*T), inner_lr = 1.0 (still 16 steps, contraction
0.8 per step). tests/test_imaml.py pins both failures on a toy problem.

The losses are per-task means of the softmax cross-entropy (the reference uses
torch's mean CrossEntropyLoss); the meta-loss and meta-gradient are averaged
over tasks. The same inner procedure (same lam) runs at evaluation.
"""

import dataclasses
from typing import Callable, ClassVar, List, Sequence, Tuple

import tensorflow as tf

from leo_suite.data.episodes import Episode
from leo_suite.errors import ConfigError
from leo_suite.models import adaptation
from leo_suite.models import base
from leo_suite.models import heads
from leo_suite.models import transforms


VARIANTS = ("paper", "reference")
# imaml_dev's `matrix_evaluator(lam_damping=10.0)`: added to lam in the HVP term.
REFERENCE_LAM_DAMPING = 10.0
# imaml_dev's `cg_solve(residual_tol=1e-10)`: per-task stop on r.r.
CG_RESIDUAL_TOL = 1e-10


@dataclasses.dataclass(frozen=True)
class Config(heads.HeadConfig):
  """iMAML hyper-parameters (paper + imaml_dev defaults, except lam, inner_lr
  and head_init: see "Defaults on embeddings" in the module docstring)."""
  flag_prefix: ClassVar[str] = "imaml_"
  inner_steps: int = base.option(16, "Number of inner gradient steps approximating phi* (paper "
              "GD variant: 16 for 5-way). Not backpropagated through.")
  inner_lr: float = base.option(1.0, "Inner step size alpha of the inner gradient steps (imaml_dev "
              "README: 0.1 with lam 2). GD on the proximal objective contracts "
              "by 1 - alpha*lam per step: 1.0 with lam 0.2 leaves 0.8^16 = 3% "
              "of the initial error after 16 steps; keep alpha*(lam + 1) "
              "< 2 for stability on unit-norm embeddings.")
  lam: float = base.option(0.2, "lambda: strength of the proximal term lam/2 ||phi - theta||^2 "
              "(paper Eq. 4). phi* - theta = -grad L_S(phi*)/lam, so 1/lam is "
              "the total step of the adaptation (MAML's alpha*T = 1.0*5 <-> "
              "0.2). The paper's 2.0 (conv net on pixels) barely moves a head "
              "on unit-norm embeddings, whose mean-CE gradient is ~ class-mean "
              "gap / N; for N-way use about 0.2 * 5/N (20-way: 0.05).")
  cg_steps: int = base.option(5, "Conjugate-gradient iterations solving (I + H/lam) v = g for "
              "the implicit meta-gradient v (paper: 5). 0 (paper variant) or "
              "<= 1 (reference variant) uses the first-order v = g.")
  cg_damping: float = base.option(
      1.0, "variant=reference only: the operator is (1 + cg_damping) v + "
              "H v/(lam + 10) (imaml_dev's cg_damping, default 1.0). Ignored "
              "by variant=paper, which solves (I + H/lam) v = g exactly.")
  variant: str = base.option("paper", "'paper': proximal inner GD and (I + H/lam) v = g. "
              "'reference': imaml_dev's form: plain inner SGD, one pull-back "
              "step phi <- phi - inner_lr*lam*(phi - theta), and "
              "((1 + cg_damping) I + H/(lam + 10)) v = g.")

  def validate(self):
    """Raises ConfigError naming the flag if a value is out of range."""
    super().validate()
    def bad(field, why):
      raise ConfigError(f"--{self.flag_prefix}{field}={getattr(self, field)!r}: {why}")
    if self.variant not in VARIANTS:
      bad("variant", f"choose one of {', '.join(VARIANTS)}")
    if not self.lam > 0:
      bad("lam", "lambda must be > 0 (the implicit gradient divides by it)")
    if self.variant == "paper" and self.inner_lr * self.lam >= 2.0:
      # GD on lam/2 ||phi - theta||^2 alone maps the error e to (1 - alpha lam) e.
      bad("inner_lr", f"with --{self.flag_prefix}lam={self.lam!r} the proximal term alone "
          f"diverges (|1 - inner_lr*lam| >= 1 per step); use inner_lr < "
          f"{2.0 / self.lam:.4g} (2/lam), or a smaller lam")
    if self.cg_steps < 0:
      bad("cg_steps", "must be >= 0")
    if self.cg_damping < 0:
      bad("cg_damping", "must be >= 0")


# -- pure functions over lists of per-task tensors [B, ...] --------------------
# A "vector" below is a list of tensors, each with leading task axis B; all
# reductions are per task, so B independent problems are solved at once.

def batched_dot(xs: Sequence[tf.Tensor], ys: Sequence[tf.Tensor]) -> tf.Tensor:
  """Per-task inner product <x_b, y_b> over all parameter tensors: [B]."""
  total = 0.
  for x, y in zip(xs, ys):
    total += tf.reduce_sum(tf.reshape(x * y, [tf.shape(x)[0], -1]), axis=1)
  return total


def _per_task(scalar, like):
  """Broadcasts a [B] scalar against a [B, ...] tensor."""
  return tf.reshape(scalar, [-1] + [1] * (like.shape.rank - 1))


def conjugate_gradient(apply_a: Callable, b: Sequence[tf.Tensor],
                       num_steps: int, residual_tol: float = CG_RESIDUAL_TOL):
  """Solves A_b x_b = b_b for every task b by `num_steps` CG iterations.

  apply_a maps a vector (list of [B, ...]) to A applied task by task; A_b must
  be symmetric positive definite. x_0 = 0. A task stops (alpha = beta = 0)
  once r.r <= residual_tol, or if p.Ap <= 0 (not positive definite along p).
  Python-unrolled: num_steps is static and small. Returns (x, r.r [B]).
  """
  b = list(b)
  x = [tf.zeros_like(t) for t in b]
  r = list(b)
  p = list(b)
  rr = batched_dot(r, r)
  for _ in range(num_steps):
    ap = apply_a(p)
    pap = batched_dot(p, ap)
    active = tf.logical_and(rr > residual_tol, pap > 0)
    alpha = tf.where(active, rr / tf.where(active, pap, tf.ones_like(pap)),
                     tf.zeros_like(rr))
    x = [xi + _per_task(alpha, xi) * pi for xi, pi in zip(x, p)]
    r = [ri - _per_task(alpha, ri) * api for ri, api in zip(r, ap)]
    rr_new = batched_dot(r, r)
    beta = tf.where(active, rr_new / tf.where(active, rr, tf.ones_like(rr)),
                    tf.zeros_like(rr))
    p = [ri + _per_task(beta, pi) * pi for ri, pi in zip(r, p)]
    rr = tf.where(active, rr_new, rr)
  return x, rr


def gradient_and_hvp(loss_fn: Callable, params: Sequence[tf.Tensor]):
  """grad L(params) and a Hessian-vector-product function at `params`.

  loss_fn(params) -> per-task losses [B] (task b depends only on params[.][b],
  so the Hessian of their sum is block-diagonal and H v is per task).
  Backward-over-backward: the gradient is recorded once on a persistent tape;
  since H is symmetric, H v = J_grad^T v is one more backward pass of that
  gradient with output_gradients=v (no re-evaluation of the loss per HVP).
  """
  params = list(params)
  with tf.GradientTape(persistent=True) as outer:
    outer.watch(params)
    with tf.GradientTape() as inner:
      inner.watch(params)
      loss = tf.reduce_sum(loss_fn(params))
    grads = inner.gradient(loss, params,
                           unconnected_gradients=tf.UnconnectedGradients.ZERO)

  def hvp(vector):
    return outer.gradient(grads, params, output_gradients=list(vector),
                          unconnected_gradients=tf.UnconnectedGradients.ZERO)
  return grads, hvp


def inner_solve(loss_fn: Callable, theta: Sequence[tf.Tensor], *,
                num_steps: int, inner_lr: float, lam: float,
                variant: str = "paper") -> List[tf.Tensor]:
  """Approximate phi*(theta) per task, with NO gradient path to theta.

  paper:     phi_{t+1} = phi_t - inner_lr (grad L(phi_t) + lam (phi_t - theta)),
             phi_0 = theta (GD on the proximal objective, paper Eq. 4).
  reference: phi_{t+1} = phi_t - inner_lr grad L(phi_t), then once
             phi <- phi - inner_lr lam (phi - theta).
  theta: list of [B, ...] tensors; loss_fn(phi) -> per-task losses [B].
  adaptation.adapt_loop with a proximal term then SGD (transforms): a
  `tf.while_loop` over stop_gradient-ed tensors, so the graph and the memory
  are the same for any num_steps and no enclosing tape records the steps.
  """
  if variant not in VARIANTS:
    raise ValueError(f"unknown iMAML variant {variant!r}; choose from {VARIANTS}")
  theta = [tf.stop_gradient(t) for t in theta]
  proximal = 1.0 if variant == "paper" else 0.0
  total_loss = lambda phi: tf.reduce_sum(loss_fn(phi))
  phi = adaptation.adapt_loop(
      lambda phi, step: adaptation.loss_gradients(total_loss, phi)[1], theta,
      transforms.chain(transforms.add_proximal(theta, proximal * lam),
                       transforms.sgd(inner_lr)),
      num_steps, differentiable=False)
  if variant == "reference":
    phi = [p - inner_lr * lam * (p - t) for p, t in zip(phi, theta)]
  return phi


def implicit_meta_gradient(support_loss_fn: Callable,
                           phi_star: Sequence[tf.Tensor],
                           query_grads: Sequence[tf.Tensor], *, lam: float,
                           cg_steps: int, cg_damping: float = 0.0,
                           variant: str = "paper"):
  """v_b ~= A_b^-1 g_b per task, by CG on HVPs of the support loss at phi*.

  paper:     A v = v + H v / lam                      (paper Eq. 7)
  reference: A v = (1 + cg_damping) v + H v / (lam + 10)
  First-order v = g when cg_steps == 0 (paper) or cg_steps <= 1 (reference).
  Returns (v, relative CG residual ||g - A v|| / ||g|| per task [B], or None
  for the first-order v = g).
  """
  query_grads = list(query_grads)
  first_order = cg_steps == 0 if variant == "paper" else cg_steps <= 1
  if first_order:
    return query_grads, None
  if variant == "paper":
    identity_coef, hessian_coef = 1.0, 1.0 / lam
  elif variant == "reference":
    identity_coef = 1.0 + cg_damping
    hessian_coef = 1.0 / (lam + REFERENCE_LAM_DAMPING)
  else:
    raise ValueError(f"unknown iMAML variant {variant!r}; choose from {VARIANTS}")
  _, hvp = gradient_and_hvp(support_loss_fn, phi_star)

  def apply_a(vector):
    return [identity_coef * v + hessian_coef * hv
            for v, hv in zip(vector, hvp(vector))]

  v, rr = conjugate_gradient(apply_a, query_grads, cg_steps)
  gg = batched_dot(query_grads, query_grads)
  relative_residual = tf.sqrt(rr / tf.maximum(gg, tf.constant(1e-30, gg.dtype)))
  return v, relative_residual


class IMAML(heads.HeadLearner):
  """iMAML over a linear/MLP head on embeddings (see module docstring)."""

  def __init__(self, config: Config, num_ways: int, embedding_dim: int,
               dtype=tf.float32, name="imaml"):
    super().__init__(config, num_ways, embedding_dim, dtype=dtype, name=name)

  def adapt(self, support_x, support_y, *, training, seed, start=None):
    """phi* per task (list of [B, ...] tensors), no gradient path to theta.

    start: the proximal anchor per task (default `initial_fast_weights`:
    theta, plus the task's prototypes under head_init='proto').
    """
    del training, seed  # iMAML's adaptation is deterministic.
    self.check_episode_shape(support_x)
    if start is None:
      start = self.initial_fast_weights(support_x, support_y)
    return inner_solve(self.support_losses_fn(support_x, support_y), start,
                       num_steps=self.config.inner_steps,
                       inner_lr=self.config.inner_lr, lam=self.config.lam,
                       variant=self.config.variant)

  def loss_and_gradients(self, episode: Episode, *, seed):
    """Query loss at phi* and the implicit meta-gradient (Algorithm 2).

    grad_theta = mean_b v_b with (I + H_b/lam) v_b = grad L_Q,b(phi*_b): v_b
    is the gradient with respect to task b's anchor, taken back to theta
    through `initial_fast_weights` (the identity unless head_init='proto'
    puts the prototypes of an MLP head's hidden features in the anchor).
    """
    config = self.config
    support_fn = self.support_losses_fn(episode.support_x, episode.support_y)
    with tf.GradientTape() as anchor_tape:
      start = self.initial_fast_weights(episode.support_x, episode.support_y)
    phi_star = self.adapt(episode.support_x, episode.support_y,
                          training=True, seed=seed, start=start)
    with tf.GradientTape() as tape:
      tape.watch(phi_star)
      logits = self.predict(phi_star, episode.query_x, training=True, seed=seed)
      per_task = heads.task_mean_cross_entropy(logits, episode.query_y)
      total = tf.reduce_sum(per_task)
    query_grads = tape.gradient(total, phi_star)  # per task: grad L_Q,b
    v, residual = implicit_meta_gradient(
        support_fn, phi_star, query_grads, lam=config.lam,
        cg_steps=config.cg_steps, cg_damping=config.cg_damping,
        variant=config.variant)
    num_tasks = tf.cast(tf.shape(episode.support_x)[0], self.dtype)
    anchor_grads = anchor_tape.gradient(start, self.head.params, output_gradients=v,
                                        unconnected_gradients=tf.UnconnectedGradients.ZERO)
    meta_grads = {p.ref(): g / num_tasks for p, g in zip(self.head.params, anchor_grads)}
    grads = [meta_grads.get(var.ref(), tf.zeros_like(var))
             for var in self.trainable_variables]
    query_loss = tf.reduce_mean(per_task)
    loss = query_loss + self.regularization()
    metrics = {
        "query_loss": query_loss,
        "accuracy": tf.reduce_mean(base.accuracy(logits, episode.query_y)),
        "support_loss": tf.reduce_mean(support_fn(phi_star)),
    }
    if residual is not None:
      metrics["cg_relative_residual"] = tf.reduce_mean(residual)
    return loss, grads, metrics


def build(config: Config, num_ways: int, embedding_dim: int,
          dtype="float32") -> IMAML:
  return IMAML(config, num_ways, embedding_dim, dtype=tf.as_dtype(dtype))


SPEC = base.LearnerSpec(
    name="imaml", build=build, config_class=Config,
    # imaml_dev's outer loop: Adam(lr, eps=1e-3) (README Omniglot lr 1e-3), no
    # clipping. Fields of leo_suite.training.optim.OuterConfig.
    outer_defaults=dict(learning_rate=1e-3, adam_epsilon=1e-3, clip_value=0.0, clip_norm=0.0),
    # --jit_compile=auto compiles this learner's step with XLA (on one device the
    # whole step): XLA/plain steps/s 1.51 / 1.32 at 1 / 5 shots (scripts/benchmark.py,
    # runs/benchmark.json).
    xla_default=True,
)
