#!/usr/bin/env python3
"""Downloads DeepMind's LEO embeddings and unpacks them for the runner.

  scripts/download_embeddings.py                    # into <repo>/embeddings
  scripts/download_embeddings.py --sha256 <digest>  # also check the digest
  scripts/download_embeddings.py --archive ~/embeddings.zip  # offline copy
  scripts/download_embeddings.py --clean            # drop a resumable .part

The result is `<dest>/<dataset>/<crop>/<split>_embeddings.pkl`, i.e. pass
`--data_path <dest>` to the runner. An interrupted download is kept in
`<dest>/.download/embeddings.zip.part` and resumed by the next run. Errors are
printed as one line and exit with status 2 (130 when interrupted).
"""

import argparse
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

from leo_suite import errors  # pylint: disable=g-import-not-at-top
from leo_suite.data import download  # pylint: disable=g-import-not-at-top
from leo_suite.data import release_archive  # pylint: disable=g-import-not-at-top

DEFAULT_DEST = os.path.join(REPO_ROOT, "embeddings")


def parse_args(argv):
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dest", default=DEFAULT_DEST,
                      help="directory that receives <dataset>/<crop>/ "
                      "(default: %(default)s)")
  parser.add_argument("--url", default=release_archive.DEFAULT_URL,
                      help="where to download embeddings.zip (default: %(default)s)")
  parser.add_argument("--sha256", default=None,
                      help="expected sha256 hex digest of embeddings.zip")
  parser.add_argument("--archive", default=None,
                      help="verify and unpack this local embeddings.zip instead "
                      "of downloading")
  parser.add_argument("--timeout", type=float, default=60.0,
                      help="seconds to wait for a connection or data (default: %(default)s)")
  parser.add_argument("--keep_archive", action="store_true",
                      help="keep <dest>/.download/embeddings.zip after unpacking")
  parser.add_argument("--clean", action="store_true",
                      help="remove <dest>/.download (a partial download) and exit")
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  try:
    if args.clean:
      download.clean(args.dest)
      return 0
    layout = download.install(
        args.dest, url=args.url, sha256=args.sha256, archive=args.archive,
        timeout=args.timeout, keep_archive=args.keep_archive)
  except errors.UserError as exc:
    print(f"error: {exc}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"\ninterrupted; what was downloaded stays in "
          f"{release_archive.download_dir(args.dest)} and the next run resumes from it "
          "(--clean removes it); nothing partial was unpacked", file=sys.stderr)
    return 130
  pairs = ", ".join(f"{d}/{c}" for d, c in sorted(layout))
  print(f"embeddings ready in {os.path.abspath(args.dest)} ({pairs}); "
        f"use --data_path {os.path.abspath(args.dest)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
