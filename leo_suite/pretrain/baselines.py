"""Non-learned few-shot baselines on fixed embeddings, batched over episodes.

Shapes: support [B, N, K, D], query [B, N, V, D] (episode b, class n, shot k);
labels are implicit: the class of support[b, n] and query[b, n] is n.
Logits come back as [B, N, V, N].

  * Nearest class mean, cosine similarity (Snell et al. 2017 with cosine;
    Chen et al. 2019 "Baseline++" style): features L2-normalised, class
    means re-normalised, logit = cos(query, mean_n).
  * Multinomial logistic regression fitted per episode (Tian et al. 2020,
    RFS): features L2-normalised, objective
        f(W, b) = sum_i CE(softmax(W^T x_i + b), y_i) + ||W||^2 / (2 C)
    (sklearn's convention, C = 1, unpenalised bias), minimised by a fixed
    number of accelerated gradient steps with step 1/L, where
    L = lambda_max(X~^T X~) / 2 + 1/C bounds the Hessian
    (X~ = [X, 1]; softmax-CE curvature <= 1/2), found by power iteration.

`BASELINES` is the one table of these methods (and of mean_dot, the
initialisation MAML-style heads start from); `evaluate` scores one, by name,
on the shared sampler's fixed episodes (the ones runner.py evaluates
learners on) through `evaluation.evaluate_baseline`, and returns mean
accuracy and the 95% interval 1.96 * std / sqrt(num_episodes). runner.py
scores its --baselines (`RUNNER_BASELINES`) as learners, through the
learner's `evaluation.Evaluator`, on the same tasks.
"""

import dataclasses
from typing import Callable, Dict, Optional

import tensorflow as tf

from leo_suite.data import episodes
from leo_suite.models import base
from leo_suite.training import evaluation


def _normalize(x):
  return tf.math.l2_normalize(x, axis=-1)


def ncm_class_means(support):
  """The L2-normalised means of the L2-normalised support [B, N, K, D] -> [B, N, D]."""
  support = tf.convert_to_tensor(support, tf.float32)
  return _normalize(tf.reduce_mean(_normalize(support), axis=2))


def ncm_cosine_logits(support, query):
  """Cosine similarity of each query to each L2-normalised class mean."""
  query = tf.convert_to_tensor(query, tf.float32)
  return tf.einsum("bnvd,bmd->bnvm", _normalize(query), ncm_class_means(support))


def mean_dot_logits(support, query):
  """<x, mean_k normalise(s_k)> per class: the class mean left unnormalised.

  What a zero linear head scores by after one gradient step of the support
  cross-entropy (W_c = alpha/N (mean_c - mean_all)), the initialisation
  MAML-style heads start from; equal to `ncm_cosine_logits` at 1-shot.
  """
  query = tf.convert_to_tensor(query, tf.float32)
  support = tf.convert_to_tensor(support, tf.float32)
  return tf.einsum("bnvd,bmd->bnvm", _normalize(query),
                   tf.reduce_mean(_normalize(support), axis=2))


def _flatten_support(support):
  """[B, N, K, D] -> x [B, N*K, D], one-hot labels [B, N*K, N]."""
  shape = tf.shape(support)
  b, n, k = shape[0], shape[1], shape[2]
  x = tf.reshape(support, [b, n * k, shape[3]])
  labels = tf.repeat(tf.range(n), k)
  one_hot = tf.tile(tf.one_hot(labels, n)[tf.newaxis], [b, 1, 1])
  return x, one_hot


def logistic_objective(weights, bias, x, one_hot, inverse_c):
  """f(W, b) per episode [B]: summed cross-entropy + ||W||^2 / (2C)."""
  logits = tf.einsum("bid,bdn->bin", x, weights) + bias[:, tf.newaxis, :]
  ce = tf.nn.softmax_cross_entropy_with_logits(one_hot, logits)
  return tf.reduce_sum(ce, axis=1) + 0.5 * inverse_c * tf.reduce_sum(
      tf.square(weights), axis=[1, 2])


def _lipschitz(x, inverse_c, iterations=30):
  """Upper bound [B] of the Hessian norm via power iteration on X~ X~^T."""
  augmented = tf.concat([x, tf.ones_like(x[..., :1])], axis=-1)
  gram = tf.einsum("bid,bjd->bij", augmented, augmented)
  vector = tf.ones_like(gram[..., 0])
  for _ in range(iterations):
    vector = tf.math.l2_normalize(tf.einsum("bij,bj->bi", gram, vector), axis=-1)
  top = tf.einsum("bi,bij,bj->b", vector, gram, vector)
  return 0.5 * top * 1.05 + inverse_c  # 5% margin on the power-iteration estimate


@tf.function
def fit_logistic_regression(support, c=1.0, steps=100):
  """Fits W [B, D, N], b [B, N] on normalised support features (see module doc)."""
  support = _normalize(tf.convert_to_tensor(support, tf.float32))
  x, one_hot = _flatten_support(support)
  inverse_c = 1.0 / tf.cast(c, tf.float32)
  step_size = (1.0 / _lipschitz(x, inverse_c))[:, tf.newaxis, tf.newaxis]
  batch, dim, ways = tf.shape(x)[0], tf.shape(x)[2], tf.shape(one_hot)[2]
  weights = tf.zeros([batch, dim, ways])
  bias = tf.zeros([batch, ways])
  prev_weights, prev_bias = weights, bias
  for k in tf.range(tf.cast(steps, tf.int32)):
    momentum = tf.cast(k, tf.float32) / (tf.cast(k, tf.float32) + 3.0)
    look_w = weights + momentum * (weights - prev_weights)
    look_b = bias + momentum * (bias - prev_bias)
    logits = tf.einsum("bid,bdn->bin", x, look_w) + look_b[:, tf.newaxis, :]
    residual = tf.nn.softmax(logits) - one_hot                     # dCE/dlogits
    grad_w = tf.einsum("bid,bin->bdn", x, residual) + inverse_c * look_w
    grad_b = tf.reduce_sum(residual, axis=1)
    prev_weights, prev_bias = weights, bias
    weights = look_w - step_size * grad_w
    bias = look_b - step_size[:, 0] * grad_b
  return weights, bias


def logistic_regression_logits(support, query, c=1.0, steps=100):
  """Logits [B, N, V, N] of per-episode logistic regression on normalised features."""
  weights, bias = fit_logistic_regression(support, c, steps)
  query = _normalize(tf.convert_to_tensor(query, tf.float32))
  return tf.einsum("bnvd,bdm->bnvm", query, weights) + bias[:, tf.newaxis, tf.newaxis, :]


class BaselineLearner(base.Learner):
  """A non-learned method behind the learner interface (no variables), so an
  `evaluation.Evaluator` scores it on the same fixed tasks by the same paths
  (table or gather) as the learners it is compared with."""

  def adapt(self, support_x, support_y, *, training, seed):
    raise NotImplementedError

  def predict(self, state, query_x, *, training, seed):
    del training, seed
    readout = self.readout(state)
    scores = tf.einsum("bnvd,bmd->bnvm", readout.row_map(query_x), readout.weights)
    return scores if readout.bias is None else scores + readout.bias[:, tf.newaxis, tf.newaxis]


class NCMCosine(BaselineLearner):
  """ncm_cosine_logits: state = the L2-normalised class means [B, N, D]."""

  def adapt(self, support_x, support_y, *, training, seed):
    del support_y, training, seed
    return ncm_class_means(support_x)

  def readout(self, state):
    return base.Readout(_normalize, state, None)


class LogisticRegression(BaselineLearner):
  """logistic_regression_logits: state = the fitted (W [B, D, N], b [B, N])."""

  def adapt(self, support_x, support_y, *, training, seed):
    del support_y, training, seed
    return fit_logistic_regression(support_x)

  def readout(self, state):
    weights, bias = state
    return base.Readout(_normalize, tf.transpose(weights, [0, 2, 1]), bias)


@dataclasses.dataclass(frozen=True)
class Baseline:
  """One non-learned method: its logits [B, N, V, N] of (support, query), and,
  for those runner.py scores beside a learner (--baselines=<flag>), the same
  method behind the learner interface: factory(num_ways, embedding_dim)."""
  logits: Callable
  learner: Optional[Callable] = None
  flag: Optional[str] = None


# Every baseline, by the name scripts/score_baselines.py's --methods and the
# Omniglot pipeline's result rows use.
BASELINES: Dict[str, Baseline] = {
    "ncm_cosine": Baseline(ncm_cosine_logits, NCMCosine, "ncm"),
    "logistic_regression": Baseline(logistic_regression_logits, LogisticRegression, "logreg"),
    "mean_dot": Baseline(mean_dot_logits),
}
# runner.py's --baselines: flag -> learner factory, for the rows that have one.
RUNNER_BASELINES = {b.flag: b.learner for b in BASELINES.values() if b.flag}


def evaluate(name: str, split, num_ways: int, num_shots: int, num_queries: int = 15,
             num_episodes: int = 1000, seed: int = 0, chunk: int = 100) -> dict:
  """Mean accuracy and 95% CI (in %) of baseline `name` on fixed episodes of `split`.

  The episodes are the shared sampler's (leo_suite.data.episodes): the same
  tasks `runner.py --evaluation_mode --eval_seed=<seed> --eval_num_query=<V>`
  scores, so learners and baselines are compared on identical tasks.
  """
  sampler = episodes.EpisodeSampler(
      split, episodes.EpisodeSpec(num_ways, num_shots, num_queries), "baseline episodes")
  result = evaluation.evaluate_baseline(BASELINES[name].logits,
                                        sampler.fixed_set(seed, num_episodes, chunk))
  return {"accuracy": 100 * result.accuracy, "ci95": 100 * result.ci95,
          "num_tasks": result.num_tasks}
