"""absl entry-point helper: user errors become one line on stderr and exit 2."""

import sys

from absl import app

from leo_suite import errors


def run(main):
  """`app.run(main)`, printing `UserError`s as `error: <message>` (exit 2)."""
  def guarded(argv):
    try:
      return main(argv)
    except errors.UserError as exc:
      print(f"error: {exc}", file=sys.stderr)
      sys.exit(2)
    except KeyboardInterrupt:
      print("interrupted; completed files are intact, rerun to resume", file=sys.stderr)
      sys.exit(130)
  app.run(guarded)
