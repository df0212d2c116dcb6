"""Shared pieces of the metric-based learners (ProtoNet, Matching Networks,
Relation Network) on pre-computed embeddings.

On fixed features the meta-learned part of these methods is a map
f_phi: R^D -> R^d on top of the embeddings (survey_learners.md, section 0):

  identity  f(x) = x, no parameters (the control: ProtoNet with it is
            nearest class mean under squared Euclidean distance);
  linear    f(x) = x W, W [D, d] (ProtoNets' CUB zero-shot run: one linear
            map on fixed GoogLeNet features), initialised (semi-)orthogonal:
            for d >= D an isometry, so the learner starts exactly at its
            identity-map control (ProtoNet: nearest class mean), for d < D a
            random orthogonal projection. A Glorot D x D map starts with
            distorted distances that the loss barely corrects: measured on
            tests/test_maml.py's toy problem, ProtoNet at 94.0% at init and
            94.9% after 200 steps at Adam 3e-3, against 99.2% for NCM;
  mlp       f(x) = relu(... relu(x W_1 + b_1) ...) W_L (Wang et al. 2018's
            ProtoNet on frozen ResNet features: Linear-ReLU-Linear).

The last layer has no bias: a constant shift cancels in f(q) - c_k (ProtoNet)
and would only add a trainable variable with zero gradient there.

Also here: the similarity of a query to a point (a prototype or a support
example), `-||f(q) - p||^2` or `cos(f(q), p)`, times a fixed or learned scale
s (`ScaledMetric`), and the one-hot/class-sum plumbing every learner needs.
Shapes: support [B, N, K, D] is handled as M = N*K examples [B, M, D], queries
[B, N', V, D] as Q = N'*V examples [B, Q, D] (N' = 1 when serving).
"""

import dataclasses
import math
from typing import ClassVar, Sequence

import sonnet as snt
import tensorflow as tf

from leo_suite import errors
from leo_suite.models import base
from leo_suite.models import heads

MAP_KINDS = ("identity", "linear", "mlp")
METRICS = ("squared_euclidean", "cosine")
MLP_INITS = ("glorot", "orthogonal", "reference")


# -- configuration shared by the three learners --------------------------------

def map_dim_field(default: int):
  """The `map_dim` field (a learner picks its own default)."""
  return dataclasses.field(default=default, metadata={
      "help": "d, the output width of the embedding map f_phi: R^D -> R^d "
              "(linear and mlp maps); 0 = D. Ignored by the identity map."})


def metric_field(default: str):
  """The `metric` field (ProtoNet and Matching Networks differ in default)."""
  return dataclasses.field(default=default, metadata={
      "help": "Similarity of a query f(x) to a point p: 'squared_euclidean' "
              "(-||f(x) - p||^2, ProtoNets' Eq. 1-2) or 'cosine' (cos(f(x), "
              "p), Matching Networks' attention). Cosines lie in [-1, 1], "
              "so the softmax over them is nearly flat unless logit_scale is "
              "large or learned; the map cannot sharpen it (cos is "
              "scale-invariant), unlike squared distances."})


@dataclasses.dataclass(frozen=True)
class MapConfig:
  """Fields of the embedding map f_phi (flags --<flag_prefix><field>)."""
  flag_prefix: ClassVar[str] = ""
  embedding_map: str = dataclasses.field(default="linear", metadata={
      "help": "The meta-learned map f_phi on the embeddings: 'identity' (no "
              "parameters), 'linear' (x W, W [D, d], orthogonal init: an "
              "isometry for d >= D, so training starts at the identity "
              "control) or 'mlp' (Linear-ReLU-...-Linear, Glorot, hidden "
              "widths map_hidden_sizes, default one hidden layer of width d)."})
  map_dim: int = map_dim_field(0)
  map_hidden_sizes: str = dataclasses.field(default="", metadata={
      "help": "Hidden widths of the mlp map, comma separated ('' = one "
              "hidden layer of width d). Only used with embedding_map=mlp."})

  def validate(self):
    """Raises ConfigError naming the flag for a map the learner cannot build."""
    prefix = self.flag_prefix
    if self.embedding_map not in MAP_KINDS:
      raise errors.ConfigError(
          f"--{prefix}embedding_map={self.embedding_map!r}: choose one of "
          f"{', '.join(MAP_KINDS)}")
    if self.map_dim < 0:
      raise errors.ConfigError(
          f"--{prefix}map_dim={self.map_dim}: must be >= 0 (0 = the embedding "
          "width D)")
    heads.parse_hidden_sizes(self.map_hidden_sizes, prefix + "map_hidden_sizes")

  def build_map(self, embedding_dim, dtype, name="embedding_map"):
    """The EmbeddingMap these fields describe, on D = embedding_dim."""
    return EmbeddingMap(self.embedding_map, embedding_dim,
                        self.map_dim or embedding_dim,
                        heads.parse_hidden_sizes(self.map_hidden_sizes),
                        dtype=dtype, name=name)


@dataclasses.dataclass(frozen=True)
class MetricConfig:
  """Fields of the similarity and its scale (flags --<flag_prefix><field>)."""
  flag_prefix: ClassVar[str] = ""
  metric: str = metric_field("squared_euclidean")
  logit_scale: float = dataclasses.field(default=1.0, metadata={
      "help": "s in logits = s * similarity (its initial value when "
              "learned). 1 = the papers' plain -d and cos. Must be > 0."})
  learn_logit_scale: bool = dataclasses.field(default=False, metadata={
      "help": "Meta-learn s (as log s, so it stays positive). Off in the "
              "papers; unit-norm embeddings make -d and cos small (<= 4 and "
              "<= 1), hence nearly flat softmaxes, unless f or s grows."})

  def validate(self):
    base.check_choices(self, self.flag_prefix, {"metric": METRICS})
    base.check_positive(self, self.flag_prefix, ["logit_scale"])

  def build_metric(self, dtype, name="metric"):
    return ScaledMetric(self.metric, self.logit_scale, self.learn_logit_scale,
                        dtype=dtype, name=name)


@dataclasses.dataclass(frozen=True)
class MapMetricConfig(MapConfig, MetricConfig):
  """An embedding map and a scaled metric (ProtoNet, Matching Networks)."""

  def validate(self):
    MapConfig.validate(self)
    MetricConfig.validate(self)


# -- modules ---------------------------------------------------------------------

def orthogonal(shape, dtype):
  """A random (semi-)orthogonal [fan_in, fan_out] matrix, drawn with TF's
  global seed: orthonormal rows if fan_in <= fan_out (x -> x W keeps norms and
  inner products), else orthonormal columns (an orthogonal projection)."""
  fan_in, fan_out = shape
  q, r = tf.linalg.qr(tf.random.normal([max(shape), min(shape)],
                                       dtype=tf.as_dtype(dtype)))
  q *= tf.sign(tf.linalg.diag_part(r))[tf.newaxis]  # Haar-distributed
  return q if fan_in >= fan_out else tf.transpose(q)


def _reference_normal(shape, dtype):
  """floodsung/LearningToCompare_FSL's Linear init: weights ~ N(0, 0.01^2)."""
  return tf.random.normal(shape, stddev=0.01, dtype=tf.as_dtype(dtype))


class MLP(snt.Module):
  """x [..., sizes[0]] -> [..., sizes[-1]]: dense layers, ReLU between them.

  init 'glorot': base.glorot_uniform weights, zero biases; 'orthogonal':
  `orthogonal` weights, zero biases; 'reference': the Relation Network code's
  N(0, 0.01^2) weights and biases of 1. The last
  layer has a bias only if `output_bias`.
  """

  def __init__(self, sizes: Sequence[int], *, output_bias: bool,
               init: str = "glorot", dtype=tf.float32, name="mlp"):
    super().__init__(name=name)
    if init not in MLP_INITS:
      raise ValueError(f"init must be one of {MLP_INITS}, got {init!r}")
    draw = {"glorot": base.glorot_uniform, "orthogonal": orthogonal,
            "reference": _reference_normal}[init]
    bias_value = 1.0 if init == "reference" else 0.0
    self.weights, self.biases = [], []
    num_layers = len(sizes) - 1
    for layer, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
      self.weights.append(tf.Variable(draw([fan_in, fan_out], dtype),
                                      name=f"w_{layer}"))
      if layer < num_layers - 1 or output_bias:
        self.biases.append(tf.Variable(
            tf.fill([fan_out], tf.constant(bias_value, dtype)), name=f"b_{layer}"))
      else:
        self.biases.append(None)

  def __call__(self, x, first_layer=0):
    """x: the input of layer `first_layer` (0: the MLP's input)."""
    num_layers = len(self.weights)
    for layer, (w, b) in list(enumerate(zip(self.weights, self.biases)))[first_layer:]:
      x = base.dense(x, w)
      if b is not None:
        x += b
      if layer < num_layers - 1:
        x = tf.nn.relu(x)
    return x


class EmbeddingMap(snt.Module):
  """f_phi: embeddings [..., D] -> features [..., d] (see module docstring)."""

  def __init__(self, kind: str, input_dim: int, output_dim: int,
               hidden_sizes: Sequence[int] = (), dtype=tf.float32,
               name="embedding_map"):
    super().__init__(name=name)
    if kind not in MAP_KINDS:
      raise ValueError(f"kind must be one of {MAP_KINDS}, got {kind!r}")
    self.kind = kind
    self.dtype = tf.as_dtype(dtype)
    if kind == "identity":
      self.output_dim, self.mlp = int(input_dim), None
      return
    self.output_dim = int(output_dim)
    hidden = []
    if kind == "mlp":
      hidden = list(hidden_sizes) or [self.output_dim]
    self.mlp = MLP([input_dim] + hidden + [self.output_dim], output_bias=False,
                   init="orthogonal" if kind == "linear" else "glorot",
                   dtype=self.dtype)

  def __call__(self, x):
    x = tf.cast(x, self.dtype)
    return x if self.mlp is None else self.mlp(x)


class ScaledMetric(snt.Module):
  """logits[b, q, m] = s * sim(queries[b, q], points[b, m]).

  sim = -||x - p||^2 or cos(x, p); s fixed or learned as log s.
  """

  def __init__(self, metric: str, scale: float, learned: bool,
               dtype=tf.float32, name="metric"):
    super().__init__(name=name)
    if metric not in METRICS:
      raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    self.metric = metric
    self.dtype = tf.as_dtype(dtype)
    self.log_scale = None
    self.fixed_scale = float(scale)
    if learned:
      self.log_scale = tf.Variable(tf.constant(math.log(scale), self.dtype),
                                   name="log_scale")

  @property
  def scale(self):
    if self.log_scale is None:
      return tf.constant(self.fixed_scale, self.dtype)
    return tf.exp(self.log_scale)

  def __call__(self, queries, points):
    """queries [B, Q, d], points [B, M, d] -> [B, Q, M]."""
    if self.metric == "squared_euclidean":
      similarity = -squared_distances(queries, points)
    else:
      similarity = cosine_similarities(queries, points)
    return self.scale * similarity

  def readout(self, row_map, points):
    """`base.Readout` of queries scored against points [B, N, d] (argmax-exact:
    the squared distance drops the per-row -s ||f(x)||^2)."""
    if self.metric == "squared_euclidean":
      return base.Readout(row_map, 2 * self.scale * points,
                          -self.scale * tf.reduce_sum(tf.square(points), -1))
    return base.Readout(lambda x: tf.math.l2_normalize(row_map(x), axis=-1),
                        self.scale * tf.math.l2_normalize(points, axis=-1), None)


class EmbeddingLearner(base.Learner):
  """Base of the metric learners: holds the config and f_phi (`embedding_map`)."""

  def __init__(self, config: MapConfig, num_ways: int, embedding_dim: int,
               dtype=tf.float32, name=None):
    super().__init__(num_ways, embedding_dim, dtype=dtype, name=name)
    config.validate()
    self.config = config
    self.embedding_map = config.build_map(embedding_dim, self.dtype)
    snt.allow_empty_variables(self)  # the identity map has no variables

  def embed(self, x):
    """f_phi of every example: [B, N, K, D] -> [B, N*K, d]."""
    return self.embedding_map(flatten_examples(x))

  def embed_support(self, support_x, support_y):
    """(f_phi(x_i) [B, M, d], one-hot y_i [B, M, N]) of the flattened support."""
    self.check_episode_shape(support_x)
    return (self.embed(support_x),
            support_one_hot(support_y, self.num_ways, self.dtype))


# -- tensor plumbing -------------------------------------------------------------

def squared_distances(x, y):
  """||x_q - y_m||^2 = ||x_q||^2 - 2 x_q.y_m + ||y_m||^2: x [B, Q, d], y [B, M, d]
  -> [B, Q, M], without the [B, Q, M, d] differences (an evaluation batch of
  100 tasks x 275 queries x 5 prototypes x 640 is 350 MB of them)."""
  return (tf.reduce_sum(tf.square(x), -1)[:, :, tf.newaxis]
          - 2.0 * tf.einsum("bqd,bmd->bqm", x, y)
          + tf.reduce_sum(tf.square(y), -1)[:, tf.newaxis, :])


def cosine_similarities(x, y):
  """cos(x_q, y_m) (zero vectors give 0): x [B, Q, d], y [B, M, d] -> [B, Q, M]."""
  return tf.einsum("bqd,bmd->bqm", tf.math.l2_normalize(x, axis=-1),
                   tf.math.l2_normalize(y, axis=-1))


def flatten_examples(x):
  """[B, N, K, ...] -> [B, N*K, ...] (support or query examples of each task)."""
  shape = tf.shape(x)
  return tf.reshape(x, tf.concat([shape[:1], [-1], shape[3:]], 0))


def per_query(scores, query_x):
  """[B, Q, N] scores of flattened queries -> [B, N', V, N] like query_x [B, N', V, D]."""
  shape = tf.shape(query_x)
  return tf.reshape(scores, tf.concat([shape[:3], tf.shape(scores)[-1:]], 0))


def support_one_hot(support_y, num_ways, dtype):
  """support_y [B, N, K] -> one-hot labels [B, M, N] of the flattened support."""
  return tf.one_hot(flatten_examples(support_y), num_ways, dtype=dtype)


def class_sums(features, one_hot):
  """sum_{i: y_i = n} features_i: features [B, M, d], one_hot [B, M, N] -> [B, N, d]."""
  return tf.einsum("bmn,bmd->bnd", one_hot, features)


def class_means(features, one_hot):
  """The mean of each class's features [B, N, d] (ProtoNets' prototypes c_n)."""
  counts = tf.reduce_sum(one_hot, axis=1)[:, :, tf.newaxis]  # [B, N, 1]
  return class_sums(features, one_hot) / counts
