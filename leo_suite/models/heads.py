"""Functional classifier heads over embeddings, for gradient-based learners.

Meta-parameters live in a Sonnet module (`HeadParams`); inner loops work on
*fast weights*: a list of tensors with a leading task axis [B, ...], so one
batched einsum evaluates every task of a meta-batch and `tf.GradientTape`
gives each task its own inner gradient (tasks do not interact).

Layout of the parameter list (L = 2 * (len(hidden_sizes) + 1) tensors):
  [W_1 [D, H_1], b_1 [H_1], ..., W_out [H_last or D, N], b_out [N]]
"""

from typing import List, Sequence

import sonnet as snt
import tensorflow as tf

from leo_suite.models import base

from leo_suite import errors


class HeadParams(snt.Module):
  """The meta-learned initialisation theta of a linear or MLP head."""

  def __init__(self, num_ways: int, embedding_dim: int,
               hidden_sizes: Sequence[int] = (), dtype=tf.float32,
               name="head"):
    super().__init__(name=name)
    sizes = [embedding_dim] + list(hidden_sizes) + [num_ways]
    self.params: List[tf.Variable] = []
    for layer, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
      self.params.append(tf.Variable(
          base.glorot_uniform([fan_in, fan_out], dtype), name=f"w_{layer}"))
      self.params.append(tf.Variable(
          tf.zeros([fan_out], dtype), name=f"b_{layer}"))

  def tiled(self, num_tasks):
    """theta copied for each task: fast weights at inner step 0, [B, ...]."""
    return [tf.tile(p[tf.newaxis], [num_tasks] + [1] * p.shape.rank)
            for p in self.params]


def head_logits(fast_weights, inputs):
  """Logits [B, ..., N] of per-task heads on inputs [B, ..., D].

  fast_weights: list [W_1, b_1, ...] with a leading task axis [B, ...].
  Hidden layers use ReLU; the output layer is linear.
  """
  batch_shape = tf.shape(inputs)[:-1]
  num_tasks = tf.shape(inputs)[0]
  h = tf.reshape(inputs, [num_tasks, -1, tf.shape(inputs)[-1]])  # [B, M, D]
  num_layers = len(fast_weights) // 2
  for layer in range(num_layers):
    w, b = fast_weights[2 * layer], fast_weights[2 * layer + 1]
    h = tf.einsum("bmd,bdo->bmo", h, w) + b[:, tf.newaxis, :]
    if layer < num_layers - 1:
      h = tf.nn.relu(h)
  return tf.reshape(h, tf.concat([batch_shape, tf.shape(h)[-1:]], 0))


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
  return grads
