"""--jit_compile: which learners XLA is on for, and the fallback when a graph
cannot be compiled.

`auto` (the default) compiles a learner's meta-training step with XLA when
its module says `XLA_DEFAULT = True`: the learners whose XLA step was faster
than the plain one at 1 and 5 shots in `scripts/benchmark.py` (on one device
XLA compiles the whole step, update included). A run records the flag as
given ("auto"); its results record the code version that resolved it, and
evaluation's result_test.json the resolved value (`jit_compile_used`). `true` and
`false` force it. If XLA cannot compile a learner's graph (an op without an
XLA kernel), the step runs without XLA and says so once in the log.
Evaluation's table-path readout has its own switch (`resolve_readout`,
`XLA_READOUT`): XLA compiles once per shape, so where it is on the calls
are padded to a few fixed task counts.
"""

from typing import Callable, Union

from absl import logging
import tensorflow as tf

from leo_suite.models import registry

JIT_CHOICES = ("auto", "true", "false")


def _resolve(setting: Union[str, bool], model: str, module_default: str) -> bool:
  """`setting` as a bool; `auto` reads the learner module's `module_default`
  attribute (runs recorded before `auto` existed hold a bool)."""
  if isinstance(setting, bool):
    return setting
  if setting not in JIT_CHOICES:
    raise ValueError(f"jit_compile must be one of {JIT_CHOICES}, got {setting!r}")
  if setting == "auto":
    return bool(getattr(registry.learner_module(model), module_default, False))
  return setting == "true"


def resolve(setting: Union[str, bool], model: str) -> bool:
  """Whether --jit_compile=`setting` compiles `model`'s step (`XLA_DEFAULT`)."""
  return _resolve(setting, model, "XLA_DEFAULT")


def resolve_readout(setting: Union[str, bool], model: str) -> bool:
  """Whether evaluation's table path compiles `model`'s readout (scores and
  `finish_readout` of a class's rows) with XLA: under `auto` where the
  learner's module says `XLA_READOUT = True` (measured faster), else as forced."""
  return _resolve(setting, model, "XLA_READOUT")


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
