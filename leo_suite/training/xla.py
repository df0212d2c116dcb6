"""--jit_compile: which learners XLA is on for, and the fallback when a graph
cannot be compiled.

`auto` (the default) compiles a learner's meta-training step with XLA when
its spec says `xla_default=True`: the learners whose XLA step was faster
than the plain one at 1 and 5 shots in `scripts/benchmark.py` (on one device
XLA compiles the whole step, update included). A run records the flag as
given ("auto"); its results record the code version that resolved it, and
evaluation's result_test.json the resolved value (`jit_compile_used`). `true` and
`false` force it. If XLA cannot compile a learner's graph (an op without an
XLA kernel), the step runs without XLA and says so once in the log.
A compiled meta-training step does not draw its random numbers (dropout,
latent and weight samples, generated noise) inside XLA: `Predrawn` draws
them with TF's own kernels in a plain graph around the compiled call and
passes them in. XLA's CPU code for the stateless generators was the cost
of LEO's XLA step (experiments/leo_xla_probe.py, XLA/plain steps/s at 1 / 5
shots: 0.71 / 0.93 with the draws inside XLA, 1.11 / 1.38 with them made
outside). So a step with XLA draws the same numbers as without it.
A learner with `training_step_examples` has its compiled step's loss and
gradients computed in parts of the meta-batch, side by side, and the next
step's numbers drawn during the step (`PartsStep`).
Evaluation's table-path readout has its own switch (`resolve_readout`,
`xla_readout`): XLA compiles once per shape, so where it is on the calls
are padded to a few fixed task counts.
"""

from typing import Callable, Union

from absl import logging
import tensorflow as tf

from leo_suite import distribute
from leo_suite.models import base
from leo_suite.models import registry

JIT_CHOICES = ("auto", "true", "false")


def _resolve(setting: Union[str, bool], model: str, spec_default: str) -> bool:
  """`setting` as a bool; `auto` reads the learner spec's `spec_default`
  field (runs recorded before `auto` existed hold a bool)."""
  if isinstance(setting, bool):
    return setting
  if setting not in JIT_CHOICES:
    raise ValueError(f"jit_compile must be one of {JIT_CHOICES}, got {setting!r}")
  if setting == "auto":
    return bool(getattr(registry.spec(model), spec_default))
  return setting == "true"


def resolve(setting: Union[str, bool], model: str) -> bool:
  """Whether --jit_compile=`setting` compiles `model`'s step (`xla_default`)."""
  return _resolve(setting, model, "xla_default")


def resolve_readout(setting: Union[str, bool], model: str) -> bool:
  """Whether evaluation's table path compiles `model`'s readout (scores and
  `finish_readout` of a class's rows) with XLA: under `auto` where the
  learner's spec says `xla_readout=True` (measured faster), else as forced."""
  return _resolve(setting, model, "xla_readout")


def is_compile_failure(error: Exception) -> bool:
  """An XLA conversion error (unsupported op), not a failure of the maths."""
  text = str(error)
  return isinstance(error, (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError)) and (
      "tf2xla conversion failed" in text or "Detected unsupported operations" in text)


class WithFallback:
  """Calls `build(True)`'s function; when XLA cannot compile it, logs one line
  and calls `build(False)`'s from then on. `build(False)` only when not `jit`."""

  def __init__(self, build: Callable[[bool], Callable], jit: bool, what: str):
    self._build, self.jit, self.what = build, bool(jit), what
    self._function = build(self.jit)

  def __call__(self, *args, **kwargs):
    if not self.jit:
      return self._function(*args, **kwargs)
    try:
      return self._function(*args, **kwargs)
    except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as error:
      if not is_compile_failure(error):
        raise
      first_line = next((line for line in str(error).splitlines() if line.strip()), "")
      logging.warning("%s: XLA cannot compile this graph (%s); running it without XLA",
                      self.what, first_line[:300])
      self.jit = False
      self._function = self._build(False)
      return self._function(*args, **kwargs)


def record_draws(function, *args):
  """The values of the random draws (`base.random_draw`) `function(*args)`
  makes, or None if one is made inside a loop or branch body.

  Call it inside a tf.function: of the traced `function` only the draws (and
  the seeds they derive from) have a consumer, so the rest of it is pruned
  from the graph and never runs. `function` must be free of side effects
  (a learner's loss and gradients; not an optimizer update).
  """
  with base.recording_draws() as recorded:
    function(*args)
  return recorded["draws"]


class Predrawn:
  """`function(*args)` compiled with XLA, its random draws made outside it.

  Called inside a tf.function: `record_draws(draw_function, *args)` draws
  the numbers in the plain graph, and the compiled `function` receives them
  (`base.replaying_draws`) in the order it asks for them. `draw_function`
  (default `function`) makes the same draws as `function` without its side
  effects. If the draws cannot be recorded (one is inside a loop body), the
  compiled function draws them itself.
  """

  def __init__(self, function: Callable, draw_function: Callable = None):
    self._function = function
    self._draw_function = draw_function or function
    self._replaying = tf.function(self._replay, jit_compile=True, autograph=False)
    self._drawing = tf.function(function, jit_compile=True, autograph=False)

  def _replay(self, args, draws):
    with base.replaying_draws(draws):
      return self._function(*args)

  def __call__(self, *args):
    draws = record_draws(self._draw_function, *args)
    if not draws:   # none to pass in, or one inside a loop body
      return self._drawing(*args)
    return self._replaying(args, draws)


class WholeStep:
  """`function` (a whole training step, update included) compiled with XLA.

  On its first call it traces `draw_function` once to see whether the step
  draws random numbers: if it does, the step is a plain tf.function around
  `Predrawn(function, draw_function)`; if not, `function` is compiled as one
  XLA call, with no plain graph around it.
  """

  def __init__(self, function: Callable, draw_function: Callable):
    self._function, self._draw_function = function, draw_function
    self._compiled = None
    self.predrawn = None   # set on the first call

  def __call__(self, *args):
    if self._compiled is None:
      seen = {}
      def trace(*inner_args):
        seen["draws"] = record_draws(self._draw_function, *inner_args)
        return tf.constant(0)
      tf.function(trace, autograph=False).get_concrete_function(*args)
      self.predrawn = bool(seen["draws"])
      self._compiled = (tf.function(Predrawn(self._function, self._draw_function), autograph=False)
                        if self.predrawn else tf.function(self._function, jit_compile=True,
                                                    autograph=False))
    return self._compiled(*args)


def part_size(size: int, bound: int) -> int:
  """The largest divisor of `size` within `bound`: parts of one shape."""
  return max(d for d in range(1, min(size, bound) + 1) if size % d == 0)


def split_draws(draws, part_draws, parts: int):
  """The meta-batch's `draws` cut into `parts` lists, the i-th holding what a
  part of its i-th slice of tasks draws, or None if they cannot be cut so.

  `part_draws` are the draws of a part (only their shapes are read). Every
  draw must be task-major: at least 2-D, with `parts` times the part's rows
  and the part's shape otherwise, so that a part's draw is a contiguous slice
  of the rows (a stateless draw fills its shape in order; draws.keep_mask
  draws its words by rows for this). A flat draw cannot be cut: its pieces
  need not start where a part's entries do.
  """
  if len(draws) != len(part_draws):
    return None
  for whole, part in zip(draws, part_draws):
    if (whole.dtype != part.dtype or whole.shape.rank is None or whole.shape.rank < 2
        or not whole.shape.is_fully_defined() or not part.shape.is_fully_defined()
        or whole.shape[1:] != part.shape[1:] or whole.shape[0] != parts * part.shape[0]):
      return None
  return [list(pieces) for pieces in zip(*(tf.split(d, parts) for d in draws))]


class PartsStep:
  """A one-device meta-training step whose loss and gradients are computed
  in compiled calls on parts of the meta-batch of at most `examples_per_call`
  support examples (tasks x N x K; at least one task), side by side, while
  the next step's random numbers are drawn.

  The parts are independent ops of one plain graph, which TF runs on the
  cores together (a 5-shot LEO step of 12 tasks: one compiled call 53 ms,
  three of 4 tasks side by side 31 ms; experiments/leo_parts_probe.py). Each part
  replays its slice of the whole meta-batch's draws (`split_draws`), so the
  step uses the numbers of the undivided step; each part's share is scaled
  by its tasks / B (distribute.scaled_loss_and_gradients), and `apply(loss,
  grads, metrics)` receives their sum, the meta-batch mean. A step of one
  part, or whose draws cannot be cut, is one compiled call, update included,
  as xla.WholeStep compiles it.

  Called eagerly with seed [s, n], a step also draws the numbers of step
  [s, n + 1] into variables, concurrently with its compiled calls; the next
  call with that seed and the same episode shapes reads them instead of
  drawing (any other call draws its own). A step's draws depend only on the
  seed and the episode's shapes (`base.random_draw` is stateless), so the
  numbers are those of the step drawing them itself.
  """

  def __init__(self, compute: Callable, apply: Callable, examples_per_call: int):
    self._compute, self.examples_per_call = compute, examples_per_call
    # The update compiled too: in plain TF its per-op cost was 3-4 ms of a
    # 15 ms one-shot LEO step (a scratch probe, stop 40).
    self._apply = tf.function(apply, jit_compile=True, autograph=False)
    self._apply_plain = apply
    self._one_part = tf.function(self._replay_and_apply, jit_compile=True, autograph=False)
    self._part = tf.function(self._replay, jit_compile=True, autograph=False)
    self._drawing = tf.function(
        lambda episode, seed: apply(*distribute.scaled_loss_and_gradients(
            compute, episode, seed, int(episode.support_x.shape[0]))),
        jit_compile=True, autograph=False)
    self._draw = tf.function(lambda episode, seed: record_draws(compute, episode, seed),
                             autograph=False)
    self._step = tf.function(
        lambda episode, seed: self._applied(episode, seed, self._draw(episode, seed)),
        autograph=False)
    self._pipelined = tf.function(self._pipelined_step, autograph=False)
    self._buffers = {}   # episode shapes -> [the (seed) they hold draws for, variables]
    self.parts = None   # set when the step is traced

  def _replay(self, episode, seed, draws, batch):
    with base.replaying_draws(draws):
      return distribute.scaled_loss_and_gradients(self._compute, episode, seed, batch)

  def _replay_and_apply(self, episode, seed, draws):
    """Loss, gradients and update in one compiled call, as xla.WholeStep
    compiles them (so a step of one part takes the same numbers as its)."""
    loss, grads, metrics = self._replay(episode, seed, draws, int(episode.support_x.shape[0]))
    return self._apply_plain(loss, list(grads), metrics)

  def _pieces(self, episode, seed, draws):
    """[(part episode, its draws)], or None when the step is one part."""
    batch, ways, shots = (int(n) for n in episode.support_x.shape[:3])
    size = part_size(batch, max(1, self.examples_per_call // (ways * shots)))
    parts = batch // size
    if parts == 1:
      return None
    pieces = [tf.nest.map_structure(lambda t, i=i: t[i * size:(i + 1) * size], episode)
              for i in range(parts)]
    # A part's draws, traced for their shapes only: a call of `_draw` here
    # would be a stateful op (it reads the variables) and run every step.
    part_draws = self._draw.get_concrete_function(pieces[0], seed).structured_outputs
    split = split_draws(draws, part_draws, parts)
    return None if split is None else list(zip(pieces, split))

  def _applied(self, episode, seed, draws):
    """The step: its parts' summed shares through the update, or one call."""
    if draws is None:   # a draw inside a loop body: the compiled call draws it
      self.parts = 1
      return self._drawing(episode, seed)
    pieces = self._pieces(episode, seed, draws) if draws else None
    self.parts = len(pieces) if pieces else 1
    if not pieces:
      return self._one_part(episode, seed, draws)
    batch = int(episode.support_x.shape[0])
    shares = [self._part(piece, seed, piece_draws, batch) for piece, piece_draws in pieces]
    loss, grads, metrics = tf.nest.map_structure(lambda *values: tf.add_n(values), *shares)
    return self._apply(loss, list(grads), metrics)

  def _pipelined_step(self, episode, seed, next_seed, buffer):
    draws = [variable.read_value() for variable in buffer]
    next_draws = self._draw(episode, next_seed)
    out = self._applied(episode, seed, draws)
    for variable, value in zip(buffer, next_draws):
      variable.assign(value)
    return out

  def __call__(self, episode, seed):
    if not tf.executing_eagerly() or self._pipelined is None:
      return self._step(episode, seed)
    first, step = (int(v) for v in seed.numpy())
    shapes = tuple(tuple(t.shape) for t in tf.nest.flatten(episode))
    if shapes not in self._buffers:
      draws = self._draw(episode, seed)
      if not draws:   # nothing to draw ahead, or a draw inside a loop body
        self._pipelined = None
        return self._step(episode, seed)
      self._buffers[shapes] = [(first, step), [tf.Variable(d, trainable=False) for d in draws]]
    held, buffer = self._buffers[shapes]
    if held != (first, step):
      for variable, value in zip(buffer, self._draw(episode, seed)):
        variable.assign(value)
    self._buffers[shapes][0] = (first, step + 1)
    return self._pipelined(episode, seed, tf.constant([first, step + 1], tf.int32), buffer)
