"""What the command-line tools print before they start: nothing from TF's C++.

TensorFlow 2.21 writes its start-up lines (oneDNN, cudart, cuInit) from C++
straight to file descriptor 2, before TF_CPP_MIN_LOG_LEVEL or absl logging
can filter them. `import_tensorflow()` imports TensorFlow and lists its
devices with descriptor 2 pointed at /dev/null, then restores it, so a tool
prints only its own lines. They come back with `--verbosity=1` (or `-v 1`)
on the command line, or LEO_SUITE_TF_LOGS=1 in the environment.

Call it at the top of a command-line script, before anything imports
TensorFlow; the library never calls it.
"""

import contextlib
import os
import sys

ENV_VAR = "LEO_SUITE_TF_LOGS"


def wants_tf_logs(argv=None) -> bool:
  argv = sys.argv if argv is None else argv
  if os.environ.get(ENV_VAR, "") not in ("", "0"):
    return True
  return any(a.startswith("--verbosity") or a == "-v" or a.startswith("-v=") for a in argv)


@contextlib.contextmanager
def _stderr_to_devnull():
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def import_tensorflow(argv=None):
  """Imports TensorFlow quietly (see the module docstring); returns the module."""
  if wants_tf_logs(argv):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return tf
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  with _stderr_to_devnull():
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.list_physical_devices()  # cuInit / cudart lines come from here
  tf.get_logger().setLevel("WARNING")  # e.g. the saver's per-save INFO lines
  return tf
