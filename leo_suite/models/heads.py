"""Functional classifier heads over embeddings, for gradient-based learners.

Meta-parameters live in a Sonnet module (`HeadParams`); inner loops work on
*fast weights*: a list of tensors with a leading task axis [B, ...], so one
batched einsum evaluates every task of a meta-batch and `tf.GradientTape`
gives each task its own inner gradient (tasks do not interact).

Layout of the parameter list (L = 2 * (len(hidden_sizes) + 1) tensors):
  [W_1 [D, H_1], b_1 [H_1], ..., W_out [H_last or D, N], b_out [N]]

Output-layer initialisation (`HEAD_INITS`, the learners' `head_init` flag):
  "zeros":  W_out = 0, b_out = 0 (hidden layers Glorot). Under LEO's sampler
            the N output slots are an arbitrary order of the task's classes,
            so anything theta writes into one slot rather than another is
            noise for an unseen task; the expected meta-gradient is symmetric
            in the slots and meta-training drifts towards a slot-symmetric
            head (Ye & Chao, ICLR'22, "How to train your MAML to excel in
            few-shot classification", make the same point for MAML). Zero is
            the symmetric point from which adaptation alone decides: at
            W_out = 0 the softmax is uniform, so one step of size alpha on the
            mean support cross-entropy (K shots per class, features h) gives
                W_c = alpha / N * (mean_k h_{c,k} - mean_{c',k} h_{c',k}),
            a nearest-centred-class-mean (prototype) classifier, which is why
            the gradient-based learners then start at the NCM baseline.
  "proto":  Proto-MAML (Triantafillou et al., ICLR'20, "Meta-Dataset",
            Sec. 4): each task starts from W_out = theta_W + 2 P^T,
            b_out = theta_b - ||p_c||^2, where p_c is the mean of the
            support features of class c at the last hidden layer (the
            embedding for a linear head), and theta_W, theta_b start at 0.
            At step 0 the head is the squared-Euclidean nearest-prototype
            classifier (-||h - p_c||^2 up to a per-query constant), so the
            learner's family holds the NCM baseline; meta-learning then
            tunes the inner loop from there (`HeadLearner.initial_fast_weights`).
  "glorot": W_out ~ Glorot uniform as the hidden layers (cbfinn/maml's
            xavier). Its random logits differ per slot by O(1) while one
            adaptation step changes them by O(alpha / N * class-mean gap):
            on L2-normalised embeddings a short meta-training cannot undo
            that (the measured cause of iMAML at chance on Omniglot).

First hidden layer initialisation (`HIDDEN_INITS`, the `hidden_init` flag):
  "glorot":          Glorot uniform (cbfinn/maml's xavier).
  "signed_identity": W_1 = [I_D, -I_D, Glorot for the other H_1 - 2D units],
            b_1 = 0, so ReLU(x W_1) holds ReLU(x) and ReLU(-x): x passes the
            first layer without loss, and the kernel h(x) . h(x') is
            x . x' on non-negative features (ReLU backbones). With the zero
            output layer, one inner step then scores like the unnormalised
            class-mean dot product (= nearest class mean at 1-shot, see
            "zeros"), where a Glorot layer starts from a random-feature
            kernel. Deeper hidden layers stay Glorot.
"""

import dataclasses
from typing import ClassVar, List, NamedTuple, Sequence, Tuple

import sonnet as snt
import tensorflow as tf

from leo_suite import errors
from leo_suite.models import base

HEAD_INITS = ("zeros", "glorot", "proto")
HEAD_INIT_HELP = (
    "Initial output layer of the head theta: 'zeros' (W_out = 0: the N "
    "output slots are arbitrary under LEO's sampler, so the symmetric head "
    "is what meta-learning converges to; one inner step from it is a "
    "nearest-class-mean classifier), 'glorot' (random, as cbfinn/maml; "
    "its random per-slot logits can swamp the adaptation on embeddings) or "
    "'proto' (Proto-MAML: each task starts from its support prototypes, "
    "W_c = 2 p_c, b_c = -||p_c||^2, plus a meta-learned residual from 0). "
    "Hidden layers are always Glorot; output biases start at 0.")


HIDDEN_INITS = ("glorot", "signed_identity")
HIDDEN_INIT_HELP = (
    "Initial first hidden layer of an MLP head: 'glorot' (random, as "
    "cbfinn/maml) or 'signed_identity' (W_1 = [I, -I, Glorot rest]: the "
    "embedding passes ReLU without loss; needs a first hidden width >= 2 x "
    "the embedding width).")


def check_head_init(value, flag_name="head_init"):
  """Raises ConfigError naming the flag unless value is one of HEAD_INITS."""
  if value not in HEAD_INITS:
    raise errors.ConfigError(
        f"--{flag_name}={value!r}: choose one of {', '.join(HEAD_INITS)}")


class HeadParams(snt.Module):
  """The meta-learned initialisation theta of a linear or MLP head."""

  def __init__(self, num_ways: int, embedding_dim: int,
               hidden_sizes: Sequence[int] = (), dtype=tf.float32,
               name="head", output_init: str = "glorot", hidden_init: str = "glorot",
               flag_prefix: str = ""):
    super().__init__(name=name)
    check_head_init(output_init)
    sizes = [embedding_dim] + list(hidden_sizes) + [num_ways]
    if hidden_init == "signed_identity" and hidden_sizes and (
        hidden_sizes[0] < 2 * embedding_dim):
      raise errors.ConfigError(
          f"--{flag_prefix}hidden_init=signed_identity needs a first hidden layer of at "
          f"least 2 x {embedding_dim} = {2 * embedding_dim} units (the embedding and its "
          f"negation); --{flag_prefix}hidden_sizes starts with {hidden_sizes[0]}")
    self.params: List[tf.Variable] = []
    num_layers = len(sizes) - 1
    for layer, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
      if layer == num_layers - 1 and output_init in ("zeros", "proto"):
        weights = tf.zeros([fan_in, fan_out], dtype)
      elif layer == 0 and layer < num_layers - 1 and hidden_init == "signed_identity":
        identity = tf.eye(fan_in, dtype=dtype)
        weights = tf.concat([identity, -identity, base.glorot_uniform(
            [fan_in, fan_out - 2 * fan_in], dtype)], axis=1)
      else:
        weights = base.glorot_uniform([fan_in, fan_out], dtype)
      self.params.append(tf.Variable(weights, name=f"w_{layer}"))
      self.params.append(tf.Variable(
          tf.zeros([fan_out], dtype), name=f"b_{layer}"))

  def tiled(self, num_tasks):
    """theta copied for each task: fast weights at inner step 0, [B, ...]."""
    return [tf.tile(p[tf.newaxis], [num_tasks] + [1] * p.shape.rank)
            for p in self.params]


def dense(h, w, b):
  return tf.einsum("bmd,bdo->bmo", h, w) + b[:, tf.newaxis, :]


def hidden_features(hidden_weights, inputs):
  """ReLU features [B, M, H] of the hidden layers [W_1, b_1, ...] on inputs
  [B, ..., D] (the inputs themselves, flattened to [B, M, D], if none)."""
  num_tasks = tf.shape(inputs)[0]
  h = tf.reshape(inputs, [num_tasks, -1, tf.shape(inputs)[-1]])  # [B, M, D]
  for layer in range(len(hidden_weights) // 2):
    h = tf.nn.relu(dense(h, hidden_weights[2 * layer], hidden_weights[2 * layer + 1]))
  return h


def head_logits(fast_weights, inputs):
  """Logits [B, ..., N] of per-task heads on inputs [B, ..., D].

  fast_weights: list [W_1, b_1, ...] with a leading task axis [B, ...].
  Hidden layers use ReLU; the output layer is linear.
  """
  batch_shape = tf.shape(inputs)[:-1]
  h = dense(hidden_features(fast_weights[:-2], inputs), fast_weights[-2], fast_weights[-1])
  return tf.reshape(h, tf.concat([batch_shape, tf.shape(h)[-1:]], 0))


def add_prototype_layer(fast_weights, support_x, support_y):
  """Proto-MAML's start: W_out += 2 P^T, b_out -= ||p_c||^2 (see HEAD_INITS).

  p_c = mean of the hidden features of the support examples labelled c
  (support_x [B, ..., D], support_y [B, ...] int in [0, N)). Then
  logits_c(h) = theta_c(h) + 2 h.p_c - ||p_c||^2 = theta_c(h) - ||h - p_c||^2
  + ||h||^2: with theta_out = 0 the argmax is the nearest prototype.
  Differentiable in the hidden layers (the prototypes are their features).
  """
  weights, bias = fast_weights[-2], fast_weights[-1]
  features = hidden_features(fast_weights[:-2], support_x)  # [B, M, H]
  num_tasks = tf.shape(features)[0]
  one_hot = tf.one_hot(tf.reshape(support_y, [num_tasks, -1]), tf.shape(bias)[-1],
                       dtype=features.dtype)  # [B, M, N]
  counts = tf.maximum(tf.reduce_sum(one_hot, axis=1), 1.0)  # [B, N]
  prototypes = tf.einsum("bmn,bmh->bnh", one_hot, features) / counts[..., tf.newaxis]
  return list(fast_weights[:-2]) + [
      weights + 2.0 * tf.transpose(prototypes, [0, 2, 1]),
      bias - tf.reduce_sum(tf.square(prototypes), axis=-1)]


def parse_hidden_sizes(text, flag_name="hidden_sizes"):
  """"" -> () (linear head); "128,64" -> (128, 64) (MLP head).

  Raises ConfigError naming the flag if a size is not a positive integer.
  """
  text = (text or "").strip()
  if not text:
    return ()
  sizes = []
  for part in text.split(","):
    part = part.strip()
    if not part.isdigit() or int(part) <= 0:
      raise errors.ConfigError(
          f"--{flag_name}={text!r}: expected comma-separated positive integers "
          f"such as '128,64' (or '' for a linear head), got {part!r}")
    sizes.append(int(part))
  return tuple(sizes)


def head_cross_entropy_gradients(fast_weights, inputs, labels):
  """Closed-form gradients of the summed per-task mean cross-entropy.

  Loss: sum_b mean_m CE(head_b(inputs[b, m]), labels[b, m]); inputs
  [B, ..., D], labels [B, ...] int. Returns one gradient per fast weight
  [B, ...]: ordinary backpropagation written out (dL/dlogits = (softmax -
  onehot) / M, then dW = h^T delta, db = sum delta, delta <- delta W^T o
  relu'), so an outer tape differentiates this expression (second order)
  instead of a nested tape's gradient graph, which is markedly cheaper.
  """
  return head_backprop(fast_weights, inputs, labels)[0]


def head_backprop(fast_weights, inputs, labels):
  """(`head_cross_entropy_gradients`, the loss's gradient [B, M, H_1] with
  respect to the first layer's pre-activations inputs W_1 + b_1)."""
  num_tasks = tf.shape(inputs)[0]
  h = tf.reshape(inputs, [num_tasks, -1, tf.shape(inputs)[-1]])  # [B, M, D]
  labels = tf.reshape(labels, [num_tasks, -1])  # [B, M]
  num_layers = len(fast_weights) // 2
  layer_inputs, pre_activations = [], []
  for layer in range(num_layers):
    w, b = fast_weights[2 * layer], fast_weights[2 * layer + 1]
    layer_inputs.append(h)
    a = tf.einsum("bmd,bdo->bmo", h, w) + b[:, tf.newaxis, :]
    pre_activations.append(a)
    h = tf.nn.relu(a) if layer < num_layers - 1 else a
  logits = h
  num_examples = tf.cast(tf.shape(logits)[1], logits.dtype)
  one_hot = tf.one_hot(labels, tf.shape(logits)[-1], dtype=logits.dtype)
  delta = (tf.nn.softmax(logits) - one_hot) / num_examples  # [B, M, O]
  grads = [None] * len(fast_weights)
  for layer in reversed(range(num_layers)):
    grads[2 * layer] = tf.einsum("bmd,bmo->bdo", layer_inputs[layer], delta)
    grads[2 * layer + 1] = tf.reduce_sum(delta, axis=1)
    if layer > 0:
      mask = tf.cast(pre_activations[layer - 1] > 0, delta.dtype)
      delta = tf.einsum("bmo,bdo->bmd", delta, fast_weights[2 * layer]) * mask
  return grads, delta


class SpanHead(NamedTuple):
  """Adapted MLP heads whose first layer is theta's W_1, scaled per task, plus
  a move in the span of each task's support rows: W_1 = scale theta_W1 +
  support^T coefficients (where SGD on a first layer moves it: its gradient
  is support^T delta; scale: L2F's attenuation, else 1).
  `rest`: the other fast weights [b_1, W_2, b_2, ...], each [B, ...]."""
  support: tf.Tensor       # [B, M, D]
  coefficients: tf.Tensor  # [B, M, H_1]
  rest: Tuple[tf.Tensor, ...]
  scale: tf.Tensor         # [B]

  def row_logits(self, shared, rows):
    """Logits [B, R, N] of rows [B or 1, R, D] given shared = rows theta_W1
    [B or 1, R, H_1]: the first layer adds (rows support^T) coefficients + b_1,
    with no [D, H_1] product per task."""
    if rows.shape[0] == 1:  # rows shared by every task: one [B M, D] x [D, R] product
      # (this orientation: twice the rate of [R, D] x [D, B M] on TF's CPU matmul)
      tasks, size = tf.shape(self.support)[0], tf.shape(self.support)[1]
      products = tf.matmul(tf.reshape(self.support, [tasks * size, -1]), rows[0],
                           transpose_b=True)
      products = tf.reshape(products, [tasks, size, -1])  # [B, M, R]
    else:
      products = tf.matmul(self.support, rows, transpose_b=True)
    moved = tf.matmul(products, self.coefficients, transpose_a=True)  # [B, R, H_1]
    shared = self.scale[:, tf.newaxis, tf.newaxis] * shared
    return head_logits(list(self.rest[1:]),
                       tf.nn.relu(shared + moved + self.rest[0][:, tf.newaxis]))

  def logits(self, theta_w1, inputs):
    """Logits [B, ..., N] on inputs [B, ..., D] (head_logits of the dense heads)."""
    batch_shape = tf.shape(inputs)[:-1]
    rows = tf.reshape(inputs, [batch_shape[0], -1, tf.shape(inputs)[-1]])
    h = self.row_logits(tf.tensordot(rows, theta_w1, 1), rows)
    return tf.reshape(h, tf.concat([batch_shape, tf.shape(h)[-1:]], 0))

  def dense(self, theta_w1):
    """The fast weights [W_1, b_1, W_2, ...] as dense [B, ...] tensors."""
    return [self.scale[:, tf.newaxis, tf.newaxis] * theta_w1 +
            tf.matmul(self.support, self.coefficients, transpose_a=True)] + list(self.rest)


def task_mean_cross_entropy(logits, labels):
  """Each task's mean softmax cross-entropy [B] (logits [B, ..., N], labels [B, ...])."""
  per_example = base.cross_entropy(logits, labels)
  return tf.reduce_mean(tf.reshape(per_example, [tf.shape(per_example)[0], -1]), axis=1)


def head_task_losses(fast_weights, inputs, labels):
  """Each task's mean cross-entropy [B] of heads `fast_weights` on inputs [B, ..., D]."""
  return task_mean_cross_entropy(head_logits(fast_weights, inputs), labels)


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """Fields every head learner has (flags --<flag_prefix><field>)."""
  flag_prefix: ClassVar[str] = ""
  hidden_sizes: str = base.option(
      "", "Hidden layer widths of the head f_theta, comma separated: '' = "
              "linear softmax head (W, b), '128,64' = ReLU MLP head.")
  inner_steps: int = base.option(5, "Inner gradient steps per task.")
  inner_lr: float = base.option(
      1.0, "alpha, the inner step size on the MEAN support cross-entropy.")
  head_init: str = base.option("zeros", HEAD_INIT_HELP)
  hidden_init: str = base.option("glorot", HIDDEN_INIT_HELP)

  def refuse(self, field, why):
    """Raises ConfigError naming --<flag_prefix><field> and its value."""
    raise errors.ConfigError(
        f"--{self.flag_prefix}{field}={getattr(self, field)!r}: {why}")

  def validate(self):
    """Raises ConfigError naming the flag for a value the method cannot run with."""
    flag_prefix = self.flag_prefix
    if self.inner_steps < 0:
      raise errors.ConfigError(
          f"--{flag_prefix}inner_steps={self.inner_steps}: must be >= 0")
    if not self.inner_lr > 0:
      raise errors.ConfigError(
          f"--{flag_prefix}inner_lr={self.inner_lr}: the inner step size must be "
          "a positive number")
    parse_hidden_sizes(self.hidden_sizes, flag_prefix + "hidden_sizes")
    check_head_init(self.head_init, flag_prefix + "head_init")
    if self.hidden_init not in HIDDEN_INITS:
      self.refuse("hidden_init", f"choose one of {', '.join(HIDDEN_INITS)}")


class HeadLearner(base.Learner):
  """The core of MAML, iMAML, L2F, Meta-LSTM and Reptile: a meta-learned head
  theta adapted per task.

  Subclasses say how the fast weights are adapted (`adapt`); this class holds
  theta (`self.head`), the per-task mean support cross-entropy and its
  closed-form gradient, and prediction with adapted fast weights.
  """

  def __init__(self, config: HeadConfig, num_ways: int, embedding_dim: int,
               dtype=tf.float32, name=None):
    super().__init__(num_ways, embedding_dim, dtype, name=name)
    config.validate()
    self.config = config
    self.head = HeadParams(num_ways, embedding_dim,
                           parse_hidden_sizes(config.hidden_sizes),
                           dtype=self.dtype, output_init=config.head_init,
                           hidden_init=config.hidden_init, flag_prefix=config.flag_prefix)

  def cast(self, x):
    return tf.cast(x, self.dtype)

  def initial_fast_weights(self, support_x, support_y):
    """Where each task's inner loop starts [B, ...]: theta, plus the task's
    support prototypes in the output layer under head_init='proto'."""
    theta = self.head.tiled(tf.shape(support_x)[0])
    if self.config.head_init == "proto":
      theta = add_prototype_layer(theta, self.cast(support_x), support_y)
    return theta

  def support_losses_fn(self, support_x, support_y):
    """fast weights [B, ...] -> each task's mean support cross-entropy [B]."""
    support_x = self.cast(support_x)
    return lambda fast_weights: head_task_losses(fast_weights, support_x, support_y)

  def support_loss_fn(self, support_x, support_y):
    """fast weights -> the sum over tasks of the task losses (a scalar whose
    gradient gives every task its own)."""
    losses = self.support_losses_fn(support_x, support_y)
    return lambda fast_weights: tf.reduce_sum(losses(fast_weights))

  def support_gradient_fn(self, support_x, support_y):
    """fast weights -> closed-form gradients of `support_loss_fn`."""
    support_x = self.cast(support_x)
    return lambda fast_weights: head_cross_entropy_gradients(
        fast_weights, support_x, support_y)

  def predict(self, state, query_x, *, training, seed):
    """Logits [B, N, V, N] of the adapted heads `state` (fast weights or a
    SpanHead) on query_x [B, N, V, D]."""
    del training, seed
    if isinstance(state, SpanHead):
      return state.logits(self.head.params[0], self.cast(query_x))
    return head_logits(list(state), self.cast(query_x))

  def readout(self, state):
    """The first layer x W_1 + b_1; an MLP head's other layers finish it.
    A SpanHead's rows map to [x theta_W1, x], shared by every task, and
    `finish_readout` adds each task's move of W_1 (x support^T) coefficients."""
    if isinstance(state, SpanHead):
      theta_w1 = self.head.params[0]
      row_map = lambda x: tf.concat([tf.matmul(self.cast(x), theta_w1), self.cast(x)], -1)
      size, hidden = state.coefficients.shape[1:]  # per row and task: [M] then [H_1] floats
      return base.Readout(row_map, None, None, finish=True, width=size + hidden)
    weights, bias = state[0], state[1]
    # An MLP head's finish reads only the layers after the first (not W_1,
    # the largest tensor, which evaluation would otherwise gather per class).
    return base.Readout(self.cast, tf.transpose(weights, [0, 2, 1]), bias,
                        finish=len(state) > 2, finish_state=tuple(state[2:]))

  def finish_readout(self, scores, state):
    """A SpanHead's logits, or the layers after the first (`readout`'s
    finish_state) on the first layer's pre-activations."""
    if isinstance(state, SpanHead):
      shared, rows = tf.split(scores, [self.head.params[0].shape[1], self.embedding_dim], -1)
      return state.row_logits(shared, rows)
    return head_logits(list(state), tf.nn.relu(scores))
