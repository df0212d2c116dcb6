"""SNAIL's two blocks (Mishra et al., ICLR 2018, App. B), each appending
channels to its input: the causal dense (temporal-convolution) block and the
causal attention block. Both run a whole sequence (`sequence`, returning what
a later step needs as a cache) or one further step from that cache
(`query_step`); leo_suite/models/snail.py stacks them."""

import math

import sonnet as snt
import tensorflow as tf

from leo_suite.models import base


def dilations(sequence_length):
  """TCBlock(T, .) dilations 2, 4, ..., 2^ceil(log2 T) (paper App. B)."""
  return [2 ** i for i in range(1, math.ceil(math.log2(sequence_length)) + 1)]


class DenseBlock(snt.Module):
  """[X, tanh(conv^f(X)) * sigmoid(conv^g(X))], causal, kernel 2, dilation d.

  The kernel's two taps act on x_{t-d} (`past`, zero before the sequence)
  and x_t (`now`); filter and gate share one [C, 2F] matrix per tap.
  """

  def __init__(self, in_channels, dilation, filters, dtype, name=None):
    super().__init__(name=name)
    self.dilation = int(dilation)
    self.kernel = tf.Variable(base.glorot_uniform([2, in_channels, 2 * filters], dtype),
                              name="kernel")
    self.bias = tf.Variable(tf.zeros([2 * filters], dtype), name="bias")
    self.step_outputs = 2 * filters

  def step_kernel(self):
    """The matrix applied to the current step's input: the `now` tap [C, 2F]."""
    return self.kernel[1]

  @staticmethod
  def _gated(pre_activation):
    filters, gates = tf.split(pre_activation, 2, axis=-1)
    return tf.tanh(filters) * tf.sigmoid(gates)

  def sequence(self, x):
    """x [S, T, C] -> ([S, T, C + F], cache: the past tap of step T+1 [S, 2F])."""
    padded = tf.pad(x, [[0, 0], [self.dilation, 0], [0, 0]])
    length = tf.shape(x)[1]
    past = base.dense(padded[:, :length], self.kernel[0]) + self.bias
    cache = tf.matmul(padded[:, length], self.kernel[0])
    new = self._gated(past + base.dense(x, self.kernel[1]))
    return tf.concat([x, new], axis=-1), cache

  def query_step(self, now, cache):
    """The F new channels of the step after the cached prefix, from
    now = x W_now [S, Q, 2F] (Q query steps per task) and cache [S, 2F]."""
    return self._gated(cache[:, tf.newaxis] + now + self.bias)


class AttentionBlock(snt.Module):
  """[X, softmax(Q K^T / sqrt(k) + causal mask) V] (paper App. B).

  Q, K, V = X [W_q, W_k, W_v] + [b_q, 0, b_v]: keys have no bias, since the
  softmax over keys is invariant to it (q.b_k is the same for every key); its
  gradient would be rounding noise, which Adam turns into +-lr steps.
  """

  def __init__(self, in_channels, key_size, value_size, dtype, name=None):
    super().__init__(name=name)
    self.sizes = [key_size, key_size, value_size]
    self.step_outputs = sum(self.sizes)
    self.kernel = tf.Variable(
        base.glorot_uniform([in_channels, sum(self.sizes)], dtype), name="kernel")
    self.bias = tf.Variable(tf.zeros([key_size + value_size], dtype), name="bias")
    self.scale = 1.0 / math.sqrt(key_size)

  def full_bias(self):
    """[b_q, 0, b_v], the bias of X [W_q, W_k, W_v]."""
    key_size = self.sizes[0]
    return tf.concat([self.bias[:key_size], tf.zeros([key_size], self.bias.dtype),
                      self.bias[key_size:]], axis=0)

  def step_kernel(self):
    """The matrix applied to the current step's input: [W_q, W_k, W_v] [C, 2k + v]."""
    return self.kernel

  def _queries_keys_values(self, products):
    """Q (scaled by 1/sqrt(k)), K, V from products = X [W_q, W_k, W_v]."""
    queries, keys, values = tf.split(products + self.full_bias(), self.sizes, axis=-1)
    return queries * self.scale, keys, values

  def sequence(self, x):
    """x [S, T, C] -> ([S, T, C + v], cache: keys [S, T, k], values [S, T, v])."""
    queries, keys, values = self._queries_keys_values(base.dense(x, self.kernel))
    logits = tf.einsum("stk,suk->stu", queries, keys)
    length = tf.shape(x)[1]
    causal = tf.linalg.band_part(tf.ones([length, length], tf.bool), -1, 0)  # u <= t
    logits = tf.where(causal, logits, tf.constant(logits.dtype.min, logits.dtype))
    read = tf.einsum("stu,suv->stv", tf.nn.softmax(logits, axis=-1), values)
    return tf.concat([x, read], axis=-1), (keys, values)

  def query_step(self, products, cache):
    """The v new channels of the step after the cached prefix, from
    products = x [W_q, W_k, W_v] [S or 1, Q, 2k + v] (1: the same for each of
    the S tasks): each query step attends to the prefix and to itself."""
    prefix_keys, prefix_values = cache
    queries, keys, values = self._queries_keys_values(products)
    own = tf.reduce_sum(queries * keys, axis=-1, keepdims=True)  # [S or 1, Q, 1]
    if products.shape[0] == 1 and prefix_keys.shape[0] != 1:
      # Queries shared by every task (the first block of evaluation's table
      # path): one [S P, k] x [k, Q] product, and no [S, Q, 2k + v] copy.
      tasks, length = tf.shape(prefix_keys)[0], tf.shape(prefix_keys)[1]
      prefix = tf.matmul(tf.reshape(prefix_keys, [tasks * length, -1]), queries[0],
                         transpose_b=True)
      prefix = tf.transpose(tf.reshape(prefix, [tasks, length, -1]), [0, 2, 1])
      own = tf.broadcast_to(own, tf.concat([[tasks], tf.shape(own)[1:]], 0))
    else:
      prefix = tf.einsum("sqk,spk->sqp", queries, prefix_keys)
    logits = tf.concat([prefix, own], axis=-1)
    weights = tf.nn.softmax(logits, axis=-1)
    return (tf.einsum("sqp,spv->sqv", weights[..., :-1], prefix_values) +
            weights[..., -1:] * values)
