"""SNAIL: a simple neural attentive meta-learner (Mishra et al., ICLR 2018).

A black-box learner: a causal sequence model reads the labelled support set and
then a query, and outputs the query's class. For one query of a task, the
input sequence of length T = N*K + 1 is (paper Sec. 3, Fig. 1)

    (e(x_1), y_1), ..., (e(x_NK), y_NK), (e(x_q), 0),

each step an embedding e(x) (the raw embedding by default, or x P, a learned
linear map D -> d_in) concatenated with the one-hot label (all zeros for the query). The
few-shot network (paper App. B, Omniglot) interleaves attention and temporal
convolution blocks (snail_blocks.py), each of which appends its output
channels to its input:

    DenseBlock(d, F):  X -> [X, tanh(conv_d^f(X)) * sigmoid(conv_d^g(X))]
                       (causal 1-D convolutions, kernel 2, dilation d);
    TCBlock(T, F):     DenseBlocks with d = 2, 4, ..., 2^ceil(log2 T);
    AttentionBlock(k, v): X -> [X, softmax_causal(Q K^T / sqrt(k)) V],
                       Q, K, V linear maps of X to k, k, v channels;
    network:           Att(64, 32), TC(T, 128), Att(256, 128), TC(T, 128),
                       Att(512, 256), Linear(N) at the last step,

trained with the cross-entropy of the last step (the query) only.

Widths on embeddings. The pre-computed embedding takes the place of the
paper's Omniglot encoder (64-d output). Channels grow from d_in + N to
d_in + N + sum(v) + 2 * F * ceil(log2 T). Defaults: the raw embedding
(d_in = D) and half (attention) / quarter (TC) of the paper's widths,
Att(32, 16), TC(T, 32), Att(64, 32), TC(T, 32), Att(128, 64): 949 channels
at D = 640, 5-way 1-shot. Measured on the suite's synthetic data (5-way
1-shot, 12 tasks per step, Adam 1e-3, 300 validation tasks; NCM 49.7%):

    e(x)              widths          300 steps       600 steps
    x P, d_in = 64    paper           59.4% (147 s)
    x P, d_in = 64    default         60.3% (29 s)
    x P, d_in = 256   paper           71.4% (113 s)
    raw (D = 640)     paper           72.1% (207 s)
    raw (D = 640)     default         74.2% (46 s)    81.2% (72 s)

A learned projection to 64 dims is the bottleneck (a random 64-d projection
of 640-d features blurs the weak class signal, and P must be learned before
attention can compare), not the widths. A zero-initialised output layer
learns slower (32.8% at 300 steps). Through the runner (demo preset, 1000
test tasks, NCM 49.7%): 71.5% after 300 steps with the defaults (validation
27.9% at step 100, 66.0% at 200, 76.4% at 300) and 88.3% after the preset's
1500 (validation 82.1% at 500, 87.1% at 1000); with the paper's widths on
x P, d_in = 64: 51.9% after 300 steps (still at chance at step 100) and
75.3% after 1500.

Each query is its own sequence [support..., query]: a query never sees another
query (appending all queries to one sequence would let later queries see
earlier ones, a transductive leak). Because the model is causal the support
positions of those sequences do not depend on the query, so `adapt` runs the
support prefix ONCE per task and keeps what the query step needs (per dense
block the dilated tap's contribution x_{NK+1-d} W_past, per attention block the
support keys and values; the key/value cache of a causal transformer), and
`predict` runs only the query step of all B*N*V sequences at once. This equals
running the B*N*V full sequences [B*N*V, N*K + 1, d_in + N] (`query_sequences`,
`sequence_logits`; tests/test_snail.py checks it). In that step every block's
input starts with [e(x_q), 0], the same for every task, so the products of
e(x_q) with all blocks' matrices are one matmul (`query_kernels`), and
evaluation computes them once per query row for all the tasks that score it
(`readout`); per task only the channels the blocks append are multiplied (at
D = 640, 5-way 1-shot: the last layer's input has 949 channels, 304 of them
appended).

Support order: predictions depend on it (a causal model reads the support in
sequence). The episode sampler presents a task's support class-major (slot 0's
K shots, then slot 1's, ...) with slots assigned to classes at random, and
serving's adapt_and_predict sorts the support by label the same way, so
training and evaluation see the same fixed order.

Start (`start`). A randomly initialised SNAIL starts at chance and stays
there until it has learned to compare and to read the labels (on the demo
data: 21.0% validation accuracy after 60 steps, 27.9% after 100).
`start=nearest_mean` (default) sets its own weights so that the first
prediction is nearest class mean: e(x) is L2-normalised, the first attention
block's queries and keys are s e(x) and e(x) (plus a key coordinate that only
support steps, which carry a label, set, so the query all but ignores
itself), its values the one-hot labels, and the output layer reads those
label channels times s (its other rows zero). The query's logits are then s
sum_{i: y_i = k} softmax_i(s cos(e(x_q), e(x_i))): at 1-shot monotone in the
cosine to each class's example, i.e. NCM; at K shots Matching Networks'
cosine attention. Every block trains from there (`_start_at_nearest_mean`).
Demo, validation: 49.9% at step 0, 90.6% after 60 steps, 91.8% after 1500
(random start: 20.8%, 21.0%, 88.6%; docs/results.md).
The figures above were measured with the random start.

Reference-code notes (eambutu/snail-pytorch): its attention normalises over the
query axis (softmax dim=1), so each key's weights sum to 1; here each query's
weights over its keys sum to 1, as in the paper. Its TC block uses
ceil(ln T) dense blocks; here ceil(log2 T), as in the paper.
"""

import dataclasses
import math
from typing import ClassVar

import tensorflow as tf

from leo_suite import errors
from leo_suite.models import base
from leo_suite.models import heads
from leo_suite.models import snail_blocks

# fold_in stream of the queries' dropout mask (the support's uses the seed itself).
QUERY_STREAM = 1
STARTS = ("random", "nearest_mean")


@dataclasses.dataclass(frozen=True)
class Config:
  """SNAIL hyperparameters (flags --snail_<field>)."""
  flag_prefix: ClassVar[str] = "snail_"
  input_dim: int = base.option(
      0, "d_in of a learned linear map P: D -> d_in applied to every "
         "embedding before its one-hot label is appended; 0 = the raw D-dim "
         "embeddings (default: a 64-d P, the paper's Omniglot encoder width, "
         "learns markedly slower on embeddings, see the module docstring).")
  key_sizes: str = base.option(
      "32,64,128", "k of each AttentionBlock(k, v), comma separated; the "
                   "network is Att, then TC(T, F) + Att for each further "
                   "entry (paper Omniglot: 64,256,512).")
  value_sizes: str = base.option(
      "16,32,64", "v of each AttentionBlock(k, v), one per key size "
                  "(paper Omniglot: 32,128,256).")
  tc_filters: int = base.option(
      32, "F of TCBlock(T, F): channels each DenseBlock appends (paper: 128).")
  sequence_length: int = base.option(
      6, "T of TCBlock(T, F), the sequence length N*K + 1 the TC blocks are "
         "sized for: ceil(log2 T) dense blocks of dilation 2, 4, ..., "
         "2^ceil(log2 T). Default 6 = 5-way 1-shot; use 26 for 5-way 5-shot. "
         "Other K still run (the convolutions are causal), with a receptive "
         "field of 2^(ceil(log2 T) + 1) - 1 steps; attention sees every step.")

  dropout_rate: float = base.option(
      0.0, "Meta-training only: inverted dropout on every input embedding "
           "(support and query), as LEO and R2D2 regularise theirs; 0 = off "
           "(the paper's SNAIL has none on its encoder's output).")

  start: str = base.option(
      "nearest_mean", "'nearest_mean': e(x) is L2-normalised and the first "
      "attention block and the output layer are set so the first prediction "
      "is nearest class mean (exactly at 1-shot; Matching Networks' cosine "
      "attention at K > 1): its key size is raised to d_in + 1 and its value "
      "size to N if smaller; 'random': Glorot weights (the paper; chance at init).")
  start_scale: float = base.option(
      10.0, "s of start=nearest_mean: the attention's scale on cos(e(x_q), "
            "e(x_i)) and the output layer's on the attended labels; > 0.")

  def key_value_sizes(self):
    """[(k, v), ...] of the attention blocks (ConfigError naming the flag)."""
    keys = heads.parse_hidden_sizes(self.key_sizes, self.flag_prefix + "key_sizes")
    values = heads.parse_hidden_sizes(self.value_sizes, self.flag_prefix + "value_sizes")
    if not keys or len(keys) != len(values):
      raise errors.ConfigError(
          f"--{self.flag_prefix}key_sizes={self.key_sizes!r} and "
          f"--{self.flag_prefix}value_sizes={self.value_sizes!r}: need the same number "
          "(at least one) of attention blocks")
    return list(zip(keys, values))

  def validate(self):
    """Raises ConfigError naming the flag for a value SNAIL cannot run with."""
    self.key_value_sizes()
    base.check_at_least(self, self.flag_prefix, {"input_dim": 0, "tc_filters": 1,
                                            "sequence_length": 2})
    base.check_choices(self, self.flag_prefix, {"start": STARTS})
    base.check_positive(self, self.flag_prefix, ["start_scale"])
    if not 0.0 <= self.dropout_rate < 1.0:
      raise errors.ConfigError(
          f"--{self.flag_prefix}dropout_rate={self.dropout_rate}: must be in [0, 1)")


class SNAIL(base.Learner):
  """Causal attention + temporal-convolution learner over (embedding, label) steps.

  Task state: one cache per block (see DenseBlock / AttentionBlock.sequence)
  of the task's support prefix.
  """

  def __init__(self, config: Config, num_ways: int, embedding_dim: int,
               dtype=tf.float32, name="snail"):
    super().__init__(num_ways, embedding_dim, dtype=dtype, name=name)
    config.validate()
    self.config = config
    if config.input_dim > 0:
      self.projection = tf.Variable(
          base.glorot_uniform([embedding_dim, config.input_dim], self.dtype),
          name="projection")
      channels = config.input_dim + num_ways
    else:
      self.projection = None
      channels = embedding_dim + num_ways
    self.step_width = channels
    self.blocks = []
    sizes = config.key_value_sizes()
    if config.start == "nearest_mean":  # room for e(x) and a support marker, the labels
      sizes[0] = (max(sizes[0][0], channels - num_ways + 1), max(sizes[0][1], num_ways))
    for index, (key_size, value_size) in enumerate(sizes):
      if index > 0:
        for dilation in snail_blocks.dilations(config.sequence_length):
          self.blocks.append(snail_blocks.DenseBlock(channels, dilation, config.tc_filters,
                                        self.dtype, name=f"dense_{index}_{dilation}"))
          channels += config.tc_filters
      self.blocks.append(snail_blocks.AttentionBlock(channels, key_size, value_size, self.dtype,
                                        name=f"attention_{index}"))
      channels += value_size
    self.channels = channels
    self.output_weights = tf.Variable(
        base.glorot_uniform([channels, num_ways], self.dtype), name="output_weights")
    self.output_bias = tf.Variable(tf.zeros([num_ways], self.dtype), name="output_bias")
    if config.start == "nearest_mean":
      self._start_at_nearest_mean()

  def _start_at_nearest_mean(self):
    """Sets the first attention block and the output layer so the query's
    logits are s * sum_{i: y_i = k} a_i, a = softmax(s cos(e_q, e_i) + 3s over
    the support, s |e_q|^2 = s for the query itself): W_q = s sqrt(k) [I; 0],
    b_q = 3 s sqrt(k) u, W_k = [I; 1 u^T] (u: the key coordinate after e(x),
    which only support steps, holding a label, set), W_v = [0; I] (the
    labels), and the output reads that block's N label channels times s.
    At 1-shot a_i is monotone in cos(e_q, e_i): nearest class mean. The
    query's own weight is below e^{-2s}; it reads a zero label."""
    width, scale = self.step_width - self.num_ways, self.config.start_scale
    block = self.blocks[0]
    key_size, _, value_size = block.sizes
    root = math.sqrt(key_size)
    identity = tf.eye(width, key_size, dtype=self.dtype)
    marker = tf.one_hot(width, key_size, dtype=self.dtype)
    label_rows = tf.zeros([self.num_ways, key_size], self.dtype)
    block.kernel.assign(tf.concat([
        tf.concat([scale * root * identity, label_rows], 0),
        tf.concat([identity, label_rows + marker], 0),
        tf.concat([tf.zeros([width, value_size], self.dtype),
                   tf.eye(self.num_ways, value_size, dtype=self.dtype)], 0)], 1))
    block.bias.assign(tf.concat([3 * scale * root * marker,
                                 tf.zeros([value_size], self.dtype)], 0))
    self.output_weights.assign(tf.concat([
        tf.zeros([self.step_width, self.num_ways], self.dtype),
        scale * tf.eye(self.num_ways, dtype=self.dtype),
        tf.zeros([self.channels - self.step_width - self.num_ways, self.num_ways],
                 self.dtype)], 0))
    self.output_bias.assign(tf.zeros_like(self.output_bias))

  def embed(self, x, *, training=False, seed=None, stream=0):
    """e(x) [..., d_in]: the raw embedding, or x P; L2-normalised with
    start=nearest_mean.

    Meta-training with dropout_rate > 0 drops embedding entries (stateless:
    `seed` folded with `stream`, 0 for the support, QUERY_STREAM for queries).
    """
    x = tf.cast(x, self.dtype)
    if training and self.config.dropout_rate > 0.0:
      x = base.dropout(x, self.config.dropout_rate,
                       tf.random.experimental.stateless_fold_in(seed, stream))
    if self.projection is not None:
      x = tf.tensordot(x, self.projection, 1)
    if self.config.start == "nearest_mean":
      x = tf.math.l2_normalize(x, axis=-1)
    return x

  def steps(self, x, labels=None, **embed_args):
    """Sequence steps [..., d_in + N]: e(x) and one-hot labels (zeros if None)."""
    x = self.embed(x, **embed_args)
    if labels is None:
      slot = tf.zeros(tf.concat([tf.shape(x)[:-1], [self.num_ways]], 0), self.dtype)
    else:
      slot = tf.one_hot(labels, self.num_ways, dtype=self.dtype)
    return tf.concat([x, slot], axis=-1)

  def query_sequences(self, support_x, support_y, query_x):
    """The B*N*V sequences [support..., query]: [B*N*V, N*K + 1, d_in + N]."""
    num_tasks = tf.shape(support_x)[0]
    support = tf.reshape(self.steps(support_x, support_y), [num_tasks, 1, -1, self.step_width])
    queries = tf.reshape(self.steps(query_x), [num_tasks, -1, 1, self.step_width])
    support = tf.broadcast_to(support, tf.concat(
        [tf.shape(queries)[:2], tf.shape(support)[2:]], 0))
    return tf.reshape(tf.concat([support, queries], axis=2),
                      [-1, tf.shape(support)[2] + 1, self.step_width])

  def sequence_logits(self, sequences):
    """Logits [S, T, N] of every step of full sequences [S, T, d_in + N]."""
    x = sequences
    for block in self.blocks:
      x, _ = block.sequence(x)
    return base.dense(x, self.output_weights) + self.output_bias

  def adapt(self, support_x, support_y, *, training, seed):
    """Runs the support prefix once per task; state = the blocks' caches."""
    self.check_episode_shape(support_x)
    num_tasks = tf.shape(support_x)[0]
    x = tf.reshape(self.steps(support_x, support_y, training=training, seed=seed),
                   [num_tasks, -1, self.step_width])
    caches = []
    for block in self.blocks:
      x, cache = block.sequence(x)
      caches.append(cache)
    return tuple(caches)

  def query_kernels(self):
    """[d_in, H]: the rows of each block's step matrix, then of the output
    layer, that multiply e(x), side by side in block order."""
    width = self.step_width - self.num_ways
    return tf.concat([block.step_kernel()[:width] for block in self.blocks] +
                     [self.output_weights[:width]], axis=1)

  def query_logits(self, products, state):
    """Logits [B, R, N] of query steps from products = e(x) query_kernels()
    [B or 1, R, H] and the support caches `state` (B tasks).

    A query step's input to block j is [e(x), 0, t_j]: the zero label slot,
    then t_j, the channels blocks before j appended. Its product with block
    j's matrix W_j is e(x) W_j[:d_in] (in `products`, which does not depend
    on the task) plus t_j W_j[d_in + N:].
    """
    sizes = [block.step_outputs for block in self.blocks] + [self.num_ways]
    parts = tf.split(products, sizes, axis=-1)
    added = None                       # t_0: no channels yet (the first step is `part`)
    for block, cache, part in zip(self.blocks, state, parts):
      step = part if added is None else part + base.dense(
          added, block.step_kernel()[self.step_width:])
      new = block.query_step(step, cache)
      added = new if added is None else tf.concat([added, new], axis=-1)
    return (parts[-1] + base.dense(added, self.output_weights[self.step_width:]) +
            self.output_bias)

  def predict(self, state, query_x, *, training, seed):
    """Logits [B, N, V, N]: the query step of each query's own sequence."""
    x = self.embed(query_x, training=training, seed=seed,      # [B, N, V, d_in]
                   stream=QUERY_STREAM)
    query_shape = tf.shape(x)[:-1]
    x = tf.reshape(x, [query_shape[0], -1, tf.shape(x)[-1]])   # [B, N*V, d_in]
    logits = self.query_logits(base.dense(x, self.query_kernels()), state)
    return tf.reshape(logits, tf.concat([query_shape, [self.num_ways]], 0))

  def readout(self, state):
    """Evaluation's shared part: e(x) query_kernels() of each query row, the
    same for every task; `finish_readout` adds the task's channels."""
    del state
    kernels = self.query_kernels()
    return base.Readout(lambda x: base.dense(self.embed(x), kernels), None, None,
                        finish=True)

  def finish_readout(self, scores, state):
    """Logits [B, R, N] from the rows' e(x) query_kernels() [1 or B, R, H]."""
    return self.query_logits(scores, state)


def build(config: Config, num_ways: int, embedding_dim: int, dtype="float32") -> SNAIL:
  """Validates `config` and builds the learner."""
  return SNAIL(config, num_ways, embedding_dim, dtype=tf.as_dtype(dtype))


SPEC = base.LearnerSpec(
    name="snail", build=build, config_class=Config,
    # Mishra et al. / eambutu/snail-pytorch: Adam at 1e-4, no clipping, PyTorch's
    # epsilon 1e-8, over tens of thousands of steps. On embeddings, with budgets of
    # a few thousand steps, 1e-3 (no clipping, epsilon 1e-8): Omniglot-small
    # meta-val 5w1s (README) 79.65% @4000 of 4000 steps at 1e-4, 91.61% @1750 of
    # 2000 at 1e-3; synthetic 5w1s, 600 steps (scripts/compare.py): 40.89% at 1e-4
    # (below NCM, 49.73%), see docs/results.md's compare table at 1e-3. `--outer_lr=1e-4`
    # restores the paper's rate. Fields of leo_suite.training.optim.OuterConfig.
    outer_defaults=dict(learning_rate=1e-3, clip_value=0.0, clip_norm=0.0),
    # --jit_compile=auto compiles this learner's step with XLA (on one device the
    # whole step): XLA/plain steps/s 1.28 / 1.31 at 1 / 5 shots (scripts/benchmark.py,
    # runs/benchmark.json).
    xla_default=True,
    # Evaluation's table path compiles the readout (each task's query step of
    # a class's rows) with XLA under --jit_compile=auto: it fuses the blocks'
    # gates and attention around the products (5-way, D = 640, V = all
    # remaining, 300 tasks, XLA/plain tasks/s in alternating pairs on the shared
    # 2-core machine: 1.30 and 1.86 at 1-shot, 1.14 and 1.36 at 5-shot).
    xla_readout=True,
    # Runs saved before the nearest-mean start existed trained from the random one.
    earlier_defaults=dict(start="random", start_scale=10.0),
)
