"""absl entry-point helper: user and disk/permission errors become one line, exit 2."""

import sys

from absl import app
import tensorflow as tf

from leo_suite import errors


def run(main):
  """`app.run(main)`, printing `UserError`s as `error: <message>` (exit 2)."""
  def guarded(argv):
    try:
      return main(argv)
    except errors.UserError as exc:
      print(f"error: {exc}", file=sys.stderr)
      sys.exit(2)
    except (OSError, tf.errors.OpError) as exc:
      message = errors.environment_error(
          exc, "the output directory",
          "Files already completed are intact (every file is written atomically); "
          "rerun the same command to complete.", "output directory")
      if message is None:
        raise
      print(f"error: {message}", file=sys.stderr)
      sys.exit(2)
    except KeyboardInterrupt:
      print("interrupted; completed files are intact, rerun to resume", file=sys.stderr)
      sys.exit(130)
  app.run(guarded)
