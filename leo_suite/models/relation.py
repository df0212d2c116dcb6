"""Relation Network (Sung, Yang, Zhang, Xiang, Torr & Hospedales, CVPR 2018)
on embeddings.

An embedding module f_phi (embedding_maps.py; the paper's Conv-4 encoder is
replaced by a map on the pre-computed features) and a relation module g_varphi
score every (class, query) pair (Eq. 1, with Sec. 3.3's K-shot class
feature, the element-wise SUM of the class's support features):

    r_{k,q} = sigma(g([sum_{i: y_i = k} f(x_i) ; f(x_q)]))

in the reference code's concatenation order [class ; query]. g is an MLP
2d -> hidden... -> 1 (the paper's two conv blocks + FC 8 + FC 1 become dense
layers on the vectors). The objective (Eq. 2) is the mean squared error of
the scores to the one-hot target, over every (query, class) pair:

    L = mean_{b, q, k} (r_{k,q} - 1[y_q = k])^2,

which `meta_loss` implements (not cross-entropy). `predict` returns the
relation logits g(.) before the sigmoid: r = sigmoid(logits) is monotone, so
their argmax is the prediction, and the exporter's softmax of them is a
proper distribution over classes.

Reference quirks kept or changed (survey_learners.md, section 3):
  * Sum pooling makes g's input scale grow with K; `class_pooling=mean` is a
    flag.
  * Initialisation. The reference draws Linear weights N(0, 0.01^2) with
    bias 1 (`module_init=reference`). On vectors that puts every ReLU of g in
    its linear regime for every input (pre-activations ~ 1 +- 0.01 ||input||),
    so g is affine, g(c, q) = a.c + b.q + const, additive in (class, query):
    every query gets the same argmax and accuracy is exactly 1/N; it stays
    there (measured: 20.0% after 300 steps on tests/test_maml.py's toy
    problem). In the paper the conv blocks' batch norm re-centres g's
    activations, which is what the bias-1 init relied on. The default is
    therefore Glorot with zero biases.
  * Feature scale. The reference's relation module reads conv features that
    end in batch norm, unit variance per channel; unit-norm embeddings give
    coordinates of RMS d^-1/2. With `normalize_features` (default) f(x) is
    rescaled to sqrt(d) f(x) / ||f(x)||, unit RMS per coordinate, before the
    class sum. Without it the MSE objective sits on a plateau at the
    constant output 1/N before g learns to compare (toy problem, Glorot g,
    120 Trainer steps at Adam 3e-3: 45% with it off, 91% with it on).
  * No batch norm: the reference's results rely on query-batch statistics at
    test time (it never calls .eval()), a transductive effect not ported.
  * Outer loop: Adam 1e-3 with a gradient-norm clip of 0.5 per module; the
    suite clips each tensor to norm 0.5 (the closest of its chains), and has
    no learning-rate schedule (the reference halves it every 100k episodes).

Start (`start`). From a random g the learner begins at chance and must learn
to compare before it matches nearest class mean. `start=cosine` (default)
adds a learned multiple of the cosine, r_{k,q} = sigmoid(g([c_k ; f(x_q)]) +
s cos(f(x_q), c_k)), s initially `cosine_scale`, with g's output layer zero:
at initialisation the logits are s times the cosine of f(x_q) to the class
mean (sum and mean pooling point the same way), nearest class mean in f's
space (NCM itself for the identity map or an isometric linear map), and g and
s train from there. `start=random` is the paper's module alone.

Measured with the runner on the synthetic data (demo preset, 5-way 1-shot,
validation accuracy on 200 tasks; docs/results.md): start=random 20.7% at
step 0, 38.8% after 60 steps, 79.3% after 400, 86.6% after 1500;
start=cosine 47.4%, 86.5%, 94.0%, 94.3% (best 94.6% at step 900). Earlier, with the
random start: 75.4% test accuracy after 300 steps against 49.7% for NCM; on
the toy problem, where NCM is near-optimal, the learned comparator stays
below NCM in short runs (95.3% after 300 steps, 96.6% after 1000, NCM 99.2%).
"""

import dataclasses
from typing import ClassVar

import tensorflow as tf

from leo_suite.data.episodes import Episode
from leo_suite.models import base
from leo_suite.models import embedding_maps
from leo_suite.models import heads


POOLINGS = ("sum", "mean")
STARTS = ("random", "cosine")


@dataclasses.dataclass(frozen=True)
class Config(embedding_maps.MapConfig):
  """Relation Network hyperparameters (flags --relation_<field>)."""
  flag_prefix: ClassVar[str] = "relation_"
  map_dim: int = embedding_maps.map_dim_field(64)
  module_hidden_sizes: str = dataclasses.field(default="64,8", metadata={
      "help": "Hidden widths of the relation module g: 2d -> ... -> 1, comma "
              "separated, ReLU between layers. The paper's module ends FC 8 "
              "-> FC 1 after two conv blocks, here one dense layer."})
  class_pooling: str = dataclasses.field(default="sum", metadata={
      "help": "K-shot class feature: 'sum' of the class's support features "
              "f(x_i) (the paper, Sec. 3.3) or their 'mean'."})
  module_init: str = dataclasses.field(default="glorot", metadata={
      "help": "Initialisation of g: 'glorot' (Glorot uniform weights, zero "
              "biases) or 'reference' (floodsung/LearningToCompare_FSL: "
              "weights N(0, 0.01^2), biases 1; on embeddings it leaves every "
              "ReLU linear, so g is additive in (class, query) and stays at "
              "chance: see the module docstring)."})
  start: str = dataclasses.field(default="cosine", metadata={
      "help": "'cosine': logits g([c_k ; f(x_q)]) + s cos(f(x_q), c_k) with "
              "g's output layer zero and s a learned scalar (initially "
              "cosine_scale), so meta-training starts at nearest class mean in "
              "f's space; 'random': g as module_init draws it, no cosine term "
              "(the paper; chance at init)."})
  cosine_scale: float = dataclasses.field(default=10.0, metadata={
      "help": "The initial s of start=cosine (the sigmoid's slope on the "
              "cosine); must be > 0. Ignored with start=random."})
  normalize_features: bool = dataclasses.field(default=True, metadata={
      "help": "Rescale f(x) to sqrt(d) f(x) / ||f(x)|| (unit RMS per "
              "coordinate, like the reference's batch-normed conv features) "
              "before pooling; off = f(x) as is (RMS d^-1/2 on unit-norm "
              "embeddings, a long plateau under the MSE loss)."})

  def validate(self):
    super().validate()
    heads.parse_hidden_sizes(self.module_hidden_sizes,
                             self.flag_prefix + "module_hidden_sizes")
    base.check_choices(self, self.flag_prefix, {"class_pooling": POOLINGS, "start": STARTS,
                                                "module_init": embedding_maps.MLP_INITS})
    base.check_positive(self, self.flag_prefix, ["cosine_scale"])


def mean_squared_error_to_one_hot(logits, labels):
  """Eq. 2: mean over every (task, query, class) of (sigmoid(logit) - 1[y = k])^2."""
  target = tf.one_hot(labels, tf.shape(logits)[-1], dtype=logits.dtype)
  return tf.reduce_mean(tf.square(tf.sigmoid(logits) - target))


class RelationNetwork(embedding_maps.EmbeddingLearner):
  """f_phi on the embeddings, g_varphi on [class feature ; query feature].

  Task state: class features [B, N, d] (sums, or means, of f(support)).
  """

  def __init__(self, config: Config, num_ways: int, embedding_dim: int,
               dtype=tf.float32, name="relation"):
    super().__init__(config, num_ways, embedding_dim, dtype=dtype, name=name)
    dim = self.embedding_map.output_dim
    hidden = list(heads.parse_hidden_sizes(config.module_hidden_sizes))
    self.relation_module = embedding_maps.MLP(
        [2 * dim] + hidden + [1], output_bias=True, init=config.module_init,
        dtype=self.dtype, name="relation_module")
    self.cosine_weight = None
    if config.start == "cosine":  # g = 0 until it learns; the skip s cos is NCM
      for output_layer in (self.relation_module.weights[-1], self.relation_module.biases[-1]):
        output_layer.assign(tf.zeros_like(output_layer))
      self.cosine_weight = tf.Variable(tf.constant(config.cosine_scale, self.dtype),
                                       name="cosine_weight")

  def embed(self, x):
    """f(x) [B, N*K, d], rescaled to norm sqrt(d) with `normalize_features`."""
    features = super().embed(x)
    if not self.config.normalize_features:
      return features
    dim = tf.cast(tf.shape(features)[-1], self.dtype)
    return tf.sqrt(dim) * tf.math.l2_normalize(features, axis=-1)

  def adapt(self, support_x, support_y, *, training, seed):
    """Class features: sum (or mean) of f(x_i) over each class's support."""
    del training, seed
    features, one_hot = self.embed_support(support_x, support_y)
    if self.config.class_pooling == "mean":
      return embedding_maps.class_means(features, one_hot)
    return embedding_maps.class_sums(features, one_hot)

  def predict(self, state, query_x, *, training, seed):
    """Relation logits g([c_k ; f(x_q)]) [B, N', V, N]; scores = sigmoid(logits).

    g's first layer is split as in `readout` (c_k W_c + f(x_q) W_q + b_1), so
    the [B, Q, N, 2d] pairs are never formed: the product costs (Q + N) d h
    per task instead of Q N 2d h (at 20-way 1-shot, 300 queries, d = 64,
    h = 256: 1.3 million against 197 million multiply-adds).
    """
    del training, seed
    query_part = self._query_scores(self.embed(query_x))       # [B, Q, h (+ d)]
    return embedding_maps.per_query(self.finish_readout(query_part, state), query_x)

  def _query_scores(self, features):
    """f(x) W_q [..., h], then f(x) / ||f(x)|| [..., d] with start=cosine."""
    scores = base.dense(features, self._query_weights())
    if self.cosine_weight is None:
      return scores
    return tf.concat([scores, tf.math.l2_normalize(features, axis=-1)], axis=-1)

  def _query_weights(self):
    """W_q, the rows of g's first layer that multiply f(x_q)."""
    return self.relation_module.weights[0][self.embedding_map.output_dim:]

  def readout(self, state):
    """g's first layer on [c_k ; f(x)] is c_k W_c + f(x) W_q + b_1: f(x) W_q
    depends on the query alone (the row map); the class term and g's other
    layers finish it."""
    row_map = lambda x: self._query_scores(self.embed(x[tf.newaxis, tf.newaxis])[0])
    return base.Readout(row_map, None, None, finish=True)

  def finish_readout(self, scores, state):
    """Relation logits [B, R, N] from f(x) W_q [B or 1, R, h] and class
    features [B, N, d]; with start=cosine, plus s cos(f(x), c_k) from the
    unit f(x) that follow f(x) W_q in `scores`."""
    module = self.relation_module
    cosine_part = 0.0
    if self.cosine_weight is not None:
      scores, unit_queries = tf.split(scores, [module.weights[0].shape[1], -1], axis=-1)
      cosine_part = self.cosine_weight * tf.matmul(
          unit_queries, tf.math.l2_normalize(state, axis=-1), transpose_b=True)
    first = base.dense(state, module.weights[0][:self.embedding_map.output_dim])
    if module.biases[0] is not None:
      first += module.biases[0]
    x = scores[:, :, tf.newaxis, :] + first[:, tf.newaxis]       # [B, R, N, h]
    if len(module.weights) > 1:  # the ReLU after g's first layer, then the rest of g
      x = module(tf.nn.relu(x), first_layer=1)
    return x[..., 0] + cosine_part

  def meta_loss(self, episode: Episode, *, training, seed):
    """Mean squared error of the relation scores to one-hot (Eq. 2)."""
    seeds = base.SeedStream(seed)
    state = self.adapt(episode.support_x, episode.support_y,
                       training=training, seed=seeds())
    logits = self.predict(state, episode.query_x, training=training, seed=seeds())
    query_loss = mean_squared_error_to_one_hot(logits, episode.query_y)
    loss = query_loss + self.regularization()
    return loss, {"query_loss": query_loss,
                  "accuracy": tf.reduce_mean(base.accuracy(logits, episode.query_y))}


def build(config: Config, num_ways: int, embedding_dim: int,
          dtype="float32") -> RelationNetwork:
  """Validates `config` and builds the learner."""
  config.validate()
  return RelationNetwork(config, num_ways, embedding_dim, dtype=dtype)


SPEC = base.LearnerSpec(
    name="relation", build=build, config_class=Config,
    # Evaluation's table path compiles this learner's readout (g on every
    # query-class pair of a class's rows) with XLA under --jit_compile=auto: it
    # fuses g's first-layer sum and ReLU with the rest of g (2,000 tasks at
    # V = all remaining, five alternating passes each, medians: 904 -> 1,324
    # tasks/s at 1-shot, 767 -> 765 at 5-shot: no gain there, no loss; the
    # timings are bimodal on the 2-core machine; scripts/benchmark.py measures it).
    xla_readout=True,
    outer_defaults=dict(learning_rate=1e-3, clip_value=0.0, clip_norm=0.5),
    # Runs saved before the cosine start existed trained from the random one.
    earlier_defaults=dict(start="random", cosine_scale=10.0),
)
