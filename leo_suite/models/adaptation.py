"""Adaptation: the inner loops of the gradient-based head learners.

`adapt_loop` is the one loop that MAML, Meta-SGD, L2F, Reptile and iMAML adapt
through, driven by gradient transforms (models/transforms.py);
`linear_inner_loop` and `logit_steps_total` are its exact logit-space form for a
linear head (MAML's fast path, LEO's evaluation adaptation).
"""

from typing import List, Sequence

import tensorflow as tf

from leo_suite.models import heads


def logit_steps_total(logits, kernel, one_hot, steps):
  """sum_t (softmax(S_t) - Y) over `steps` steps S_{t+1} = S_t - kernel (softmax(S_t) - Y).

  The logit-space form of gradient steps on a linear classifier (see
  `linear_inner_loop`; LEO's evaluation loops): logits, one_hot [B, M, N],
  kernel [B, M, M] holds the step sizes and the loss scale.
  """
  total = tf.zeros_like(logits)
  for _ in range(int(steps)):
    delta = tf.nn.softmax(logits) - one_hot
    total += delta
    logits -= tf.matmul(kernel, delta)
  return total


def linear_inner_loop(initial, support_x, support_y, lrs, steps, first_order=False):
  """`steps` gradient steps of linear heads on the mean support cross-entropy,
  run on the support logits instead of the weights.

  initial: [W [B, D, N], b [B, N]]; support_x [B, ..., D], support_y [B, ...];
  lrs: one scalar step size per tensor (alpha_W, alpha_b). With logits
  S = X W + b of the M support rows X [B, M, D] and Delta = (softmax(S) - Y) / M
  (d mean CE / d S), a step changes W by -alpha_W X^T Delta and b by
  -alpha_b 1^T Delta, so S by -(alpha_W X X^T + alpha_b 1 1^T) Delta. The loop
  therefore runs on [B, M, N] logits with one [B, M, M] kernel, and returns
  W - alpha_W X^T A, b - alpha_b 1^T A with A = sum_t Delta_t: the fast
  weights of `maml.inner_loop` with `head_cross_entropy_gradients` (equal in
  exact arithmetic; tests), without a D-wide product per step. An outer tape
  differentiates it to second order; `first_order` stops the gradient at A
  (d W_T / d W = I, as stop_gradient on every inner gradient).
  """
  weights, bias = initial
  lr_weights, lr_bias = [tf.cast(lr, weights.dtype) for lr in lrs]
  num_tasks = tf.shape(support_x)[0]
  x = tf.reshape(support_x, [num_tasks, -1, tf.shape(support_x)[-1]])  # [B, M, D]
  one_hot = tf.one_hot(tf.reshape(support_y, [num_tasks, -1]), tf.shape(bias)[-1],
                       dtype=weights.dtype)  # [B, M, N]
  num_examples = tf.cast(tf.shape(x)[1], weights.dtype)
  kernel = lr_weights * tf.matmul(x, x, transpose_b=True) + lr_bias  # [B, M, M]
  total = logit_steps_total(heads.dense(x, weights, bias), kernel / num_examples, one_hot,
                            steps) / num_examples
  if first_order:
    total = tf.stop_gradient(total)
  return [weights - lr_weights * tf.matmul(x, total, transpose_a=True),
          bias - lr_bias * tf.reduce_sum(total, axis=1)]


def span_sgd_loop(theta_w1, initial, support_x, support_y, learning_rate,
                  steps, scale=None) -> heads.SpanHead:
  """`steps` SGD steps at `learning_rate` of MLP heads on the mean support
  cross-entropy, the first layer kept factored (heads.SpanHead); no gradient path.

  initial: the start [W_1, b_1, W_2, ...] [B, ...] whose W_1 is theta_w1
  [D, H_1] times `scale` [B] (default 1) for every task (initial[0] is not
  read). With the M support rows
  X [B, M, D], a step moves W_1 by -lr X^T Delta and b_1 by -lr 1^T Delta
  (Delta [B, M, H_1]: the loss's gradient at the first pre-activations
  Z = X W_1 + b_1), so Z by -lr (X X^T + 1 1^T) Delta: the loop runs on Z and
  the other layers, and W_1 = theta_w1 - lr X^T sum_t Delta_t (the fast
  weights of `adapt_loop` with transforms.sgd, equal in exact arithmetic;
  tests), without a D x H_1 product per task and step.
  """
  num_tasks = tf.shape(support_x)[0]
  x = tf.reshape(support_x, [num_tasks, -1, tf.shape(support_x)[-1]])  # [B, M, D]
  labels = tf.reshape(support_y, [num_tasks, -1])
  rate = tf.convert_to_tensor(learning_rate, x.dtype)
  kernel = tf.matmul(x, x, transpose_b=True) + 1.0  # [B, M, M]
  bias, layers = initial[1], [tf.stop_gradient(p) for p in initial[2:]]
  if scale is None:
    scale = tf.ones([num_tasks], x.dtype)
  scale = tf.stop_gradient(scale)
  start = tf.stop_gradient(scale[:, tf.newaxis, tf.newaxis] * tf.tensordot(x, theta_w1, 1) +
                           bias[:, tf.newaxis])

  def body(step, z, total, layers):
    grads, delta = heads.head_backprop(layers, tf.nn.relu(z), labels)
    delta = tf.matmul(delta, layers[0], transpose_b=True) * tf.cast(z > 0, z.dtype)
    return (step + 1, z - rate * tf.matmul(kernel, delta), total + delta,
            [p - rate * g for p, g in zip(layers, grads)])

  _, _, total, layers = tf.while_loop(
      lambda step, *_: step < steps, body,
      (tf.constant(0), start, tf.zeros_like(start), layers))
  return tf.nest.map_structure(tf.stop_gradient, heads.SpanHead(
      x, -rate * total, tuple([bias - rate * tf.reduce_sum(total, axis=1)] + layers), scale))


def loss_gradients(loss_fn, params: Sequence[tf.Tensor]):
  """(loss_fn(params), d loss_fn / d params); recorded by any outer tape."""
  params = list(params)
  with tf.GradientTape() as tape:
    tape.watch(params)
    loss = loss_fn(params)
  grads = tape.gradient(loss, params,
                        unconnected_gradients=tf.UnconnectedGradients.ZERO)
  return loss, grads


def adapt_loop(gradient_fn, params: Sequence[tf.Tensor], transform, steps, *,
               differentiable: bool = True, first_order: bool = False) -> List[tf.Tensor]:
  """The one inner loop of the gradient-based head learners, `steps` times

      g_t = gradient_fn(phi_t, t);  u_t, s_t = transform.update(g_t, s_{t-1}, phi_t)
      phi_{t+1} = phi_t + u_t,      phi_0 = params,  s_0 = transform.init(params)

  `transform` (models/transforms.py) is what differs between learners: a
  fixed or learned rate per parameter (MAML, Meta-SGD, L2F: Eq. 1 of Finn et
  al.), SGD or Adam (Reptile's U^k), a proximal term then SGD (iMAML, Eq. 4).
  gradient_fn(params, step) -> gradients like params (`step` lets Reptile
  draw a mini-batch per step).

  differentiable: a Python loop (`steps` a static int) that an outer tape
  differentiates through, second order unless `first_order` (stop_gradient on
  every g_t: d phi_T / d phi_0 = I). Otherwise a `tf.while_loop` on
  stop_gradient-ed tensors with no gradient path: the graph and the memory are
  the same for any `steps` (Reptile evaluates with 50).
  """
  params = list(params)
  if differentiable:
    state = transform.init(params)
    for step in range(int(steps)):
      grads = gradient_fn(params, step)
      if first_order:
        grads = [tf.stop_gradient(g) for g in grads]
      updates, state = transform.update(grads, state, params)
      params = [p + u for p, u in zip(params, updates)]
    return params

  def body(step, params, state):
    updates, state = transform.update(gradient_fn(params, step), state, params)
    return step + 1, [p + u for p, u in zip(params, updates)], state

  params = [tf.stop_gradient(tf.convert_to_tensor(p)) for p in params]
  _, params, _ = tf.while_loop(lambda step, *_: step < steps, body,
                               (tf.constant(0), params, transform.init(params)))
  return [tf.stop_gradient(p) for p in params]
