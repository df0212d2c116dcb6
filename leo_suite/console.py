"""What the command-line tools print: nothing from TF's C++, errors as one line.

TensorFlow 2.21 writes its start-up lines (oneDNN, cudart, cuInit) from C++
straight to file descriptor 2, before TF_CPP_MIN_LOG_LEVEL or absl logging
can filter them. `import_tensorflow()` imports TensorFlow and lists its
devices with descriptor 2 pointed at /dev/null, then restores it, so a tool
prints only its own lines. They come back with `--verbosity=1` (or `-v 1`)
on the command line, or LEO_SUITE_TF_LOGS=1 in the environment.

Call it at the top of a command-line script, before anything imports
TensorFlow; the library never calls it. `run(main)` is every tool's
`app.run`: the one path from an error to a message and an exit code.
"""

import contextlib
import os
import sys

from absl import app

from leo_suite import errors
from leo_suite import safeio

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


def _value(setting):
  return setting() if callable(setting) else setting


def _is_tf_error(exc) -> bool:
  tf = sys.modules.get("tensorflow")  # no TF error can happen before TF is imported
  return tf is not None and isinstance(exc, tf.errors.OpError)


HELP_FLAGS = ("help", "helpshort", "helpfull", "helpxml", "?")


def asks_for_help(argv) -> bool:
  """Whether the command line asks for absl's help (--help, --helpfull, -?...)."""
  flags_part = argv[1:argv.index("--")] if "--" in argv else argv[1:]
  return any(a.startswith("-") and a.lstrip("-").split("=")[0] in HELP_FLAGS
             for a in flags_part)


DEFAULT_WHERE = "the output directory"
DEFAULT_RECOVERY = ("Files already completed are intact (every file is written atomically); "
                    "rerun the same command to complete.")
DEFAULT_INTERRUPTED = "interrupted; completed files are intact, rerun to resume"
MAX_ERROR_CHARS = 2000   # an error line is never a screenful (a long list is cut)


def capped(message, limit: int = MAX_ERROR_CHARS) -> str:
  """`message` as one line of at most `limit` characters, saying how much was cut."""
  return safeio.one_line(message, limit, say_cut=True)


def guarded(main, where=DEFAULT_WHERE, recovery=DEFAULT_RECOVERY,
            location_flag="output directory", interrupted=DEFAULT_INTERRUPTED):
  """`main` with the command-line tools' one error-to-exit path.

  errors.UserError -> `error: <message>`, exit 2 (no traceback); OSError or a
  TF OpError about the file system -> errors.environment_error's one line
  (naming `where`, `recovery` and `location_flag`), exit 2, any other TF
  error re-raised (a bug keeps its traceback); KeyboardInterrupt ->
  `interrupted`, exit 130. `where`, `recovery` and `interrupted` may be
  callables, called when the error happens (e.g. to name a parsed flag).
  """
  def guarded_main(argv):
    try:
      return main(argv)
    except errors.UserError as exc:
      print(f"error: {capped(exc)}", file=sys.stderr)
      sys.exit(2)
    except Exception as exc:  # pylint: disable=broad-except
      if not (isinstance(exc, OSError) or _is_tf_error(exc)):
        raise
      message = errors.environment_error(exc, _value(where), _value(recovery), location_flag)
      if message is None:
        raise
      print(f"error: {capped(message)}", file=sys.stderr)
      sys.exit(2)
    except KeyboardInterrupt:
      print(_value(interrupted), file=sys.stderr)
      sys.exit(130)
  return guarded_main


def run(main, **error_path):
  """`absl.app.run(guarded(main, **error_path))` (see `guarded`). Asked for
  help, the tool prints it and exits 0 (absl's own exit code is 1)."""
  started = []
  guarded_main = guarded(main, **error_path)
  if hasattr(sys.stdout, "reconfigure"):   # a non-UTF-8 file name never ends a tool
    sys.stdout.reconfigure(errors="backslashreplace")

  def started_main(argv):
    started.append(True)
    return guarded_main(argv)

  try:
    app.run(started_main)
  except SystemExit as exc:
    if exc.code == 1 and not started and asks_for_help(sys.argv):
      sys.exit(0)
    raise
