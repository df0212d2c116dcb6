"""L2F, "Learning to Forget" (Baik et al., CVPR 2020): MAML with a
task-conditioned attenuation of the initialisation.

For each task, with theta = [W_1, b_1, ..., W_out, b_out] (L tensors):
  1. task embedding  g_l = mean over the elements of dL_support/dtheta_l at
     theta, one signed scalar per parameter tensor, held constant
     (stop_gradient; the reference computes it with create_graph=False);
  2. gamma = sigmoid(Lin_2(ReLU(Lin_1(g))))  with an L -> L -> L MLP;
  3. theta~_l = gamma_l * theta_l  (the scalar scales weights and biases);
  4. MAML's inner loop from theta~ (`maml.inner_loop`), query loss at the end.
The outer loop trains theta and the attenuator. With gamma = 1 this is MAML.

Loss scale and inner rate follow `maml` (mean support cross-entropy).

Which g_l carry information: for a softmax output layer every row of
dL/dlogits = (softmax - onehot) / M sums to 0, so the element means of the
output layer's dW and db are identically 0 for every task. Only hidden
layers give a task-dependent g (small: 1e-6 to 1e-3 at init); with a
linear head (L = 2) gamma would be one learned constant. Hence the default
MLP head (one hidden layer of 64, L = 4; per-task fast weights of a 640x256
layer make a meta-step about 5x slower for the same L).

Attenuator init: PyTorch's nn.Linear default, U(+-1/sqrt(fan_in)) for the
weights and biases (gamma starts near 0.5 but not exactly), except that the
first layer's biases are drawn from the non-negative half U(0, 1/sqrt(L)):
since g is tiny, a hidden unit with a negative bias would output 0 for
every task and never receive a gradient (a dead unit); with L = 4 a seed
can leave every unit dead.
The attenuator's initial weights are drawn from TensorFlow's global seed
(the runner sets it from --seed), like every other learner's initialisation.
Evaluation runs 5 inner steps, as training and as the reference (MAML's
default is 10). Measured on the toy problem of tests/test_maml.py (60
meta-training steps, seed 0): 97.14% with 5 evaluation steps, 97.70% with
10, nearest class mean 99.20%.
Reference-code details not reproduced: a fixed first-to-second-order switch
at epoch 10, first-order evaluation, summing (not averaging) the outer loss
over tasks, and the top-3-checkpoint ensemble at test time.
"""

import dataclasses
import math
from typing import ClassVar

import sonnet as snt
import tensorflow as tf

from leo_suite.models import adaptation
from leo_suite.models import base
from leo_suite.models import maml


@dataclasses.dataclass(frozen=True)
class Config(maml.Config):
  """MAML's hyperparameters (flags --l2f_<field>), an MLP head by default."""
  flag_prefix: ClassVar[str] = "l2f_"
  hidden_sizes: str = base.option(
      "64", "Hidden layer widths of the head f_theta, comma separated; the "
              "attenuator has L = 2 * (layers) inputs and outputs. '64' "
              "(default) gives L = 4; '' = linear head (L = 2), whose "
              "task embedding g is identically 0 (gamma not task-dependent).")
  eval_inner_steps: int = base.option(
      5, "Inner gradient steps per task at evaluation (the reference: "
              "5, as in training).")
  head_init: str = base.option("glorot", "Initial output layer of the head: 'glorot' (default), "
              "'zeros' or 'proto' (Proto-MAML, see heads.py). L2F keeps 'glorot' unlike MAML: its task embedding "
              "is the layer-wise mean support gradient at theta, and with "
              "W_out = 0 nothing flows back to the hidden layers, so g = 0 "
              "for every task and gamma would not depend on the task.")


def attenuate(params, gamma):
  """theta~_l = gamma[:, l] * theta_l for per-task params [B, ...], gamma [B, L]."""
  return [gamma[:, l][(...,) + (tf.newaxis,) * (p.shape.rank - 1)] * p
          for l, p in enumerate(params)]


class Attenuator(snt.Module):
  """gamma = sigmoid(W_2 ReLU(W_1 g + b_1) + b_2): g [B, L] -> gamma [B, L].

  Init: see the module docstring (PyTorch default, b_1 >= 0: no dead units).
  """

  def __init__(self, num_tensors: int, dtype=tf.float32, name="attenuator"):
    super().__init__(name=name)
    bound = 1.0 / math.sqrt(num_tensors)  # PyTorch nn.Linear default
    def uniform(shape, low=-bound):  # TF's global seed, as glorot_uniform
      return tf.random.uniform(shape, low, bound, dtype=tf.as_dtype(dtype))
    size = [num_tensors, num_tensors]
    self.w_1 = tf.Variable(uniform(size), name="w_1")
    self.b_1 = tf.Variable(uniform([num_tensors], low=0.0), name="b_1")
    self.w_2 = tf.Variable(uniform(size), name="w_2")
    self.b_2 = tf.Variable(uniform([num_tensors]), name="b_2")

  def __call__(self, task_embedding):
    hidden = tf.nn.relu(tf.matmul(task_embedding, self.w_1) + self.b_1)
    return tf.sigmoid(tf.matmul(hidden, self.w_2) + self.b_2)


class L2F(maml.MAML):
  """MAML whose per-task initialisation is attenuated by gamma(task)."""

  def __init__(self, config: Config, num_ways: int, embedding_dim: int,
               dtype=tf.float32, name="l2f"):
    super().__init__(config, num_ways, embedding_dim, dtype=dtype, name=name)
    self.attenuator = Attenuator(len(self.head.params), dtype=self.dtype)

  def task_embedding(self, support_x, support_y):
    """g [B, L]: layer-wise mean support gradient at theta, a constant
    (at theta plus the task's prototypes under head_init='proto')."""
    theta = super().initial_fast_weights(support_x, support_y)
    grads = self.support_gradient_fn(support_x, support_y)(theta)
    means = [tf.reduce_mean(tf.reshape(g, [tf.shape(g)[0], -1]), axis=1)
             for g in grads]
    return tf.stop_gradient(tf.stack(means, axis=1))

  def attenuation(self, support_x, support_y):
    """gamma [B, L] in (0, 1), one factor per parameter tensor."""
    return self.attenuator(self.task_embedding(support_x, support_y))

  def initial_fast_weights(self, support_x, support_y):
    """theta~ = gamma o theta per task [B, ...] (where the inner loop starts;
    under head_init='proto' theta holds the task's prototypes, see heads.py)."""
    theta = super().initial_fast_weights(support_x, support_y)
    return attenuate(theta, self.attenuation(support_x, support_y))


  def readout_state(self, support_x, support_y, *, seed):
    """The evaluation-mode heads: with an MLP head and one fixed step size, a
    heads.SpanHead (W_1 = gamma_1 theta_W1 + X^T C: SGD moves W_1 in the span
    of the support rows X), whose table readout costs O(V D M) per task and
    class instead of O(V D H_1); `adapt`'s fast weights otherwise."""
    if self.inner_lrs is not None or len(self.head.params) <= 2:
      return super().readout_state(support_x, support_y, seed=seed)
    self.check_episode_shape(support_x)
    theta = super().initial_fast_weights(support_x, support_y)
    gamma = self.attenuation(support_x, support_y)
    return adaptation.span_sgd_loop(
        self.head.params[0], attenuate(theta, gamma), self.cast(support_x), support_y,
        self.config.inner_lr, self.config.eval_inner_steps, scale=gamma[:, 0])


def build(config: Config, num_ways: int, embedding_dim: int, dtype="float32"):
  return L2F(config, num_ways, embedding_dim, dtype=dtype)


SPEC = base.LearnerSpec(
    name="l2f", build=build, config_class=Config,
    # The reference (MAML++ code): Adam 1e-3; it clamps the classifier's
    # gradients to +-10 (not the attenuator's): here every tensor's. Fields of
    # leo_suite.training.optim.OuterConfig.
    outer_defaults=dict(learning_rate=1e-3, clip_value=10.0, clip_norm=0.0),
    # --jit_compile=auto compiles this learner's step with XLA (on one device the
    # whole step): XLA/plain steps/s 1.28 / 1.12 at 1 / 5 shots (scripts/benchmark.py,
    # runs/benchmark.json).
    xla_default=True,
    # Evaluation's table readout (a SpanHead's rows through the attenuated
    # first layer and the head) with XLA: 2,000 tasks, XLA/plain tasks/s
    # 1,186-1,222 / 750-771 at 1-shot, 489-491 / 450-459 at 5-shot.
    xla_readout=True,
    eval_fields=maml.SPEC.eval_fields,
)
