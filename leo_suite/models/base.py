"""The one learner interface every meta-learner implements.

All methods work on a meta-batch of B tasks at once (tensors carry a leading
task axis), so a learner vectorises over tasks with batched einsums instead of
a per-task `map_fn`. A single task is simply B = 1.

    state  = learner.adapt(support_x, support_y, training=..., seed=...)
    logits = learner.predict(state, query_x, training=..., seed=...)
    loss, metrics = learner.meta_loss(episode, training=..., seed=...)
    loss, grads, metrics = learner.loss_and_gradients(episode, seed=...)

Shapes: support_x [B, N, K, D], support_y [B, N, K] (int32 in 0..N-1),
query_x [B, N, V, D], query_y [B, N, V]; logits [B, N, V, N].

Randomness (dropout, latent/weight sampling) is stateless: every call takes a
`seed` (int32 [2] tensor) and derives per-op seeds from it with `SeedStream`,
so a step is a pure function of (variables, episode, seed). This is what makes
a resumed run replay an uninterrupted one exactly.
"""

import contextlib
import dataclasses
import threading
import types
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Tuple

import sonnet as snt
import tensorflow as tf

from leo_suite import errors
from leo_suite.data.episodes import Episode


class Readout(NamedTuple):
  """An adapted task's classifier read out of a linear map of query rows:
  scores(x) = row_map(x) @ weights^T + bias for every query row x [D]
  (row_map(x) itself when weights is None), and argmax logits(x) = argmax
  scores(x), or argmax of `learner.finish_readout(scores, state)` when
  `finish`. row_map is task-independent, so evaluation applies it once to a
  class's rows and scores them against every task that holds the class with
  one product."""
  row_map: Callable[[tf.Tensor], tf.Tensor]  # [R, D] -> [R, d]
  weights: Optional[tf.Tensor]               # [B, M, d] or None (scores = row_map(x))
  bias: Optional[tf.Tensor]                  # [B, M] or None
  finish: bool = False                       # scores [B, R, M] -> logits via finish_readout
  # Floats per row and task of the finish's intermediates, when neither the
  # weights' M nor the embedding's D says it (evaluation sizes its calls by it).
  width: Optional[int] = None
  # What `finish_readout` reads of the tasks' state when it needs only part
  # of it (None: the whole state); evaluation gathers only this per class.
  finish_state: Any = None


class SeedStream:
  """Hands out distinct stateless seeds derived from one base seed."""

  def __init__(self, seed):
    self._seed = tf.cast(seed, tf.int32)
    self._count = 0

  def __call__(self):
    self._count += 1
    return tf.random.experimental.stateless_fold_in(self._seed, self._count)


def glorot_uniform(shape, dtype):
  """Glorot/Xavier uniform init drawn with TF's global seed (tf.random.set_seed).

  (Keras 3 initializers draw from their own seed generator, which the runner's
  --seed would not control; this keeps initialisation reproducible.)
  """
  fan_in, fan_out = shape[-2], shape[-1]
  for size in shape[:-2]:
    fan_in, fan_out = fan_in * size, fan_out * size
  limit = (6.0 / (fan_in + fan_out)) ** 0.5
  return tf.random.uniform(shape, -limit, limit, dtype=tf.as_dtype(dtype))


# The stateless RNG algorithm of every learner's random draw (dropout, latent
# and weight samples, generated noise). Philox is what TF's default
# ("auto_select") picks without XLA, so plain runs draw the same numbers as
# before; under XLA on CPU the default instead lowers to a generator that
# fuses into the consuming dot and made LEO's XLA step 3.2x SLOWER than plain
# (experiments/leo_xla_probe.py: XLA/plain 0.31 with the default, 0.95 with
# Philox, 1-shot; a random uniform -> tensordot, [12, 5, 15, 640] x [640, 64],
# took 107 ms with the default against 1.5 ms with Philox).
RNG_ALG = "philox"


DRAW_KINDS = ("uniform", "normal", "bits")


class _DrawMode(threading.local):
  """Where `random_draw` takes its numbers from (see `recording_draws`)."""
  recorded: Optional[list] = None      # draws made while recording
  graph: Any = None                    # the graph recording started in
  nested: bool = False                 # a draw was made inside a loop or branch
  replay: Optional[list] = None        # pre-drawn values still to hand out


_DRAW_MODE = _DrawMode()


def random_draw(kind, shape, seed, dtype):
  """Every learner's stateless random draw: `kind` 'uniform' ([0, 1)),
  'normal' (N(0, 1)) or 'bits' (uint32), of `shape`, from `seed` with RNG_ALG.

  Inside `replaying_draws` it hands out the next pre-drawn value instead:
  that is how an XLA-compiled step receives numbers drawn outside XLA
  (training/xla.py, `Predrawn`).
  """
  mode = _DRAW_MODE
  if mode.replay is not None:
    if not mode.replay:
      raise RuntimeError("replaying_draws: the function made more random draws "
                         "than were recorded for it")
    value = mode.replay.pop(0)
    if value.dtype != tf.as_dtype(dtype if kind != "bits" else tf.uint32):
      raise RuntimeError(f"replaying_draws: a {kind} draw of dtype {dtype} got a "
                         f"recorded value of dtype {value.dtype.name}")
    return value
  if kind == "uniform":
    value = tf.random.stateless_uniform(shape, seed, dtype=dtype, alg=RNG_ALG)
  elif kind == "normal":
    value = tf.random.stateless_normal(shape, seed, dtype=dtype, alg=RNG_ALG)
  elif kind == "bits":
    value = tf.random.stateless_uniform(shape, seed, minval=None, maxval=None,
                                        dtype=tf.uint32, alg=RNG_ALG)
  else:
    raise ValueError(f"random_draw: kind must be one of {DRAW_KINDS}, got {kind!r}")
  if mode.recorded is not None:
    mode.nested |= tf.compat.v1.get_default_graph() is not mode.graph
    mode.recorded.append(value)
  return value


@contextlib.contextmanager
def recording_draws():
  """Collects every `random_draw` made inside into the yielded list. The list
  is set to None on exit if a draw was made inside a tf.while_loop or cond
  body (its value cannot leave that body, so it cannot be pre-drawn)."""
  mode = _DRAW_MODE
  if mode.recorded is not None or mode.replay is not None:
    raise RuntimeError("recording_draws: already recording or replaying")
  mode.recorded, mode.graph, mode.nested = [], tf.compat.v1.get_default_graph(), False
  result = {"draws": mode.recorded}
  try:
    yield result
  finally:
    if mode.nested:
      result["draws"] = None
    mode.recorded, mode.graph, mode.nested = None, None, False


@contextlib.contextmanager
def replaying_draws(draws):
  """`random_draw` inside hands out `draws` in order, and all must be used."""
  mode = _DRAW_MODE
  if mode.recorded is not None or mode.replay is not None:
    raise RuntimeError("replaying_draws: already recording or replaying")
  mode.replay = list(draws)
  try:
    yield
    if mode.replay:
      raise RuntimeError(f"replaying_draws: {len(mode.replay)} recorded draws were "
                         "not used: the function drew differently when recorded")
  finally:
    mode.replay = None


def dropout(x, rate, seed):
  """Stateless inverted dropout with the suite's RNG algorithm: the numbers
  of tf.nn.experimental.stateless_dropout, drawn through `random_draw`."""
  keep = random_draw("uniform", tf.shape(x), seed, x.dtype) >= rate
  scaled = x * tf.constant(1.0 / (1.0 - rate), x.dtype)
  return tf.where(keep, scaled, tf.zeros([], x.dtype))


def dense(x, weights):
  """x [..., C] @ weights [C, O] for any number of leading axes.

  tensordot, not einsum("...c,co->...o"): TF's gradient of that einsum
  broadcasts to [..., C, O] before reducing (measured, gradient of a sum of
  squares on CPU: 34 ms against 0.7 ms for x [25, 100, 64], O = 64; 2.9 GB
  for SNAIL's x [12, 75, 1200], O = 256).
  """
  return tf.tensordot(x, weights, 1)


def cross_entropy(logits, labels):
  """Per-example softmax cross-entropy with one-hot targets.

  One-hot (not sparse) targets keep a second derivative available, as LEO's
  release notes; shape: labels' shape.
  """
  num_classes = tf.shape(logits)[-1]
  one_hot = tf.one_hot(labels, num_classes, dtype=logits.dtype)
  return tf.nn.softmax_cross_entropy_with_logits(labels=one_hot, logits=logits)


def accuracy(logits, labels):
  """Per-task accuracy [B] of logits [B, ..., N] against labels [B, ...]."""
  hits = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=labels.dtype), labels),
                 tf.float32)
  return tf.reduce_mean(tf.reshape(hits, [tf.shape(hits)[0], -1]), axis=1)


class Learner(snt.Module):
  """Base class: a meta-learner over a fixed (num_ways, embedding_dim).

  Subclasses implement `adapt` and `predict`, and may extend `meta_loss`
  (extra penalties) and `loss_and_gradients` (implicit meta-gradients).
  `evaluation_adapt_tasks`: at most this many tasks per evaluation
  `readout_state` call (None: the whole batch), for a learner whose
  adaptation streams state-sized buffers that a smaller call keeps in cache.
  `training_step_examples`: at most this many support examples (tasks x N x
  K, at least one task) per compiled loss-and-gradients call of a one-device
  XLA meta-training step, whose next step's draws are made during it
  (training/xla.py, `PartsStep`; None: xla.WholeStep).
  """
  evaluation_adapt_tasks: Optional[int] = None
  training_step_examples: Optional[int] = None

  def __init__(self, num_ways: int, embedding_dim: int, dtype=tf.float32,
               name=None):
    super().__init__(name=name)
    self.num_ways = int(num_ways)
    self.embedding_dim = int(embedding_dim)
    self.dtype = tf.as_dtype(dtype)

  # -- the interface ---------------------------------------------------------
  def adapt(self, support_x, support_y, *, training, seed) -> Any:
    raise NotImplementedError

  def predict(self, state, query_x, *, training, seed) -> tf.Tensor:
    raise NotImplementedError

  def readout_state(self, support_x, support_y, *, seed) -> Any:
    """The evaluation-mode (`training=False`) adapted state that `readout`
    (and `predict`) read: `adapt`'s by default; a learner may keep it in a
    form that is cheaper to score many query rows with (Reptile's first
    layer as theta plus the span of the support rows)."""
    return self.adapt(support_x, support_y, training=False, seed=seed)

  def readout(self, state) -> Optional[Readout]:
    """The evaluation-mode (`training=False`) classifier of `state` (from
    `readout_state`) as a `Readout`, or None when it is not linear in a
    shared row map."""
    del state
    return None

  def finish_readout(self, scores, state):
    """Logits [B, R, N] from a `Readout`'s scores [B, R, M] of the tasks of
    `state` (row-wise; only called when the readout says `finish`). Without
    readout weights the scores are the same for every task and come as
    [1, R, M], to be broadcast."""
    del state
    return scores

  def regularization(self) -> tf.Tensor:
    """Penalties on the meta-parameters added once to the meta-loss."""
    return tf.constant(0.0, self.dtype)

  def meta_loss(self, episode: Episode, *, training,
                seed) -> Tuple[tf.Tensor, Dict[str, tf.Tensor]]:
    """Mean query cross-entropy after adaptation, plus regularisation."""
    seeds = SeedStream(seed)
    state = self.adapt(episode.support_x, episode.support_y,
                       training=training, seed=seeds())
    logits = self.predict(state, episode.query_x, training=training, seed=seeds())
    query_loss = tf.reduce_mean(cross_entropy(logits, episode.query_y))
    loss = query_loss + self.regularization()
    return loss, {"query_loss": query_loss,
                  "accuracy": tf.reduce_mean(accuracy(logits, episode.query_y))}

  def loss_and_gradients(self, episode: Episode, *, seed):
    """Meta-training loss, its gradients w.r.t. `trainable_variables`, metrics."""
    variables = self.trainable_variables
    with tf.GradientTape() as tape:
      loss, metrics = self.meta_loss(episode, training=True, seed=seed)
    grads = tape.gradient(loss, variables,
                          unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return loss, grads, metrics

  def check_episode_shape(self, support_x):
    """Raises if N or D differ from what the learner was built for."""
    shape = support_x.shape
    if shape.rank != 4:
      raise ValueError(f"support_x must be [B, N, K, D], got shape {shape}")
    n, d = shape[1], shape[3]
    if (n is not None and n != self.num_ways) or (d is not None and d != self.embedding_dim):
      raise ValueError(
          f"{type(self).__name__} was built for {self.num_ways}-way tasks of "
          f"dimension {self.embedding_dim}, got support_x of shape {shape}")


def option(default, help_text: str):
  """A learner Config field: its default and its flag's help (paper notation)."""
  return dataclasses.field(default=default, metadata={"help": help_text})


def check_at_least(config, flag_prefix: str, minimums):
  """Raises ConfigError naming --<flag_prefix><field> unless each config field
  in `minimums` ({field: smallest allowed value}) is at least its minimum."""
  for field, minimum in minimums.items():
    value = getattr(config, field)
    if value < minimum:
      raise errors.ConfigError(
          f"--{flag_prefix}{field}={value}: must be >= {minimum}")


def check_choices(config, flag_prefix: str, choices):
  """Raises ConfigError naming --<flag_prefix><field> unless each config field
  in `choices` ({field: allowed values}) holds one of its allowed values."""
  for field, allowed in choices.items():
    value = getattr(config, field)
    if value not in allowed:
      raise errors.ConfigError(
          f"--{flag_prefix}{field}={value!r}: choose one of {', '.join(allowed)}")


def check_positive(config, flag_prefix: str, fields):
  """Raises ConfigError naming --<flag_prefix><field> unless each of `fields` is > 0."""
  for field in fields:
    value = getattr(config, field)
    if not value > 0:
      raise errors.ConfigError(f"--{flag_prefix}{field}={value}: must be > 0")


def config_fields(config_cls):
  """(name, default, help) of a learner's frozen config dataclass."""
  return [(f.name, f.default, f.metadata.get("help", ""))
          for f in dataclasses.fields(config_cls)]


@dataclasses.dataclass(frozen=True)
class LearnerSpec:
  """One learner as the suite sees it, declared at the bottom of its module
  and listed in registry.py.

  `build(config, num_ways, embedding_dim, dtype)` -> Learner; `config_class`:
  a frozen dataclass whose fields carry `metadata={"help": ...}` and whose
  `flag_prefix` names its flags `--<flag_prefix><field>` (config.py);
  `validate()` raises errors.ConfigError naming the flag. `outer_defaults`:
  fields of leo_suite.training.optim.OuterConfig (its reference code's outer
  loop); `eval_fields`: config fields that only change evaluation, which
  evaluation may override; `xla_default` / `xla_readout`: --jit_compile=auto
  compiles the meta-training step / evaluation's table readout with XLA
  (training/xla.py); `supports_export`: serving can export it.
  `earlier_defaults`: config fields added after runs were first saved, with
  the value such a run trained with (a config.json without the field is read
  with it, so an old run resumes and evaluates as it was trained).
  """
  name: str
  build: Callable[..., Learner]
  config_class: type
  outer_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  eval_fields: Tuple[str, ...] = ()
  xla_default: bool = False
  xla_readout: bool = False
  supports_export: bool = True
  earlier_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    object.__setattr__(self, "outer_defaults", types.MappingProxyType(dict(self.outer_defaults)))
    object.__setattr__(self, "earlier_defaults",
                       types.MappingProxyType(dict(self.earlier_defaults)))
    object.__setattr__(self, "eval_fields", tuple(self.eval_fields))

  @property
  def flag_prefix(self) -> str:
    return self.config_class.flag_prefix
