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
Evaluation's table-path readout has its own switch (`resolve_readout`,
`xla_readout`): XLA compiles once per shape, so where it is on the calls
are padded to a few fixed task counts.
"""

from typing import Callable, Union

from absl import logging
import tensorflow as tf

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
