#!/usr/bin/env python3
"""Downloads DeepMind's LEO embeddings and unpacks them for the runner.

  scripts/download_embeddings.py                    # into <repo>/embeddings
  scripts/download_embeddings.py --sha256 <digest>  # also check the digest
  scripts/download_embeddings.py --archive ~/embeddings.zip  # offline copy
  scripts/download_embeddings.py --clean            # drop a resumable .part

The result is `<dest>/<dataset>/<crop>/<split>_embeddings.pkl`, i.e. pass
`--data_path <dest>` to the runner. An interrupted download is kept in
`<dest>/.download/embeddings.zip.part` and resumed by the next run. Errors are
printed as one line and exit with status 2 (130 when interrupted). Nothing
here imports TensorFlow (no start-up lines to silence).
"""

import os

from absl import flags

from leo_suite import console
from leo_suite import errors
from leo_suite.data import download

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DEST = os.path.join(REPO_ROOT, "embeddings")

flags.DEFINE_string("dest", DEFAULT_DEST, "directory that receives <dataset>/<crop>/")
flags.DEFINE_string("url", download.DEFAULT_URL, "where to download embeddings.zip")
flags.DEFINE_string("sha256", None, "expected sha256 hex digest of embeddings.zip")
flags.DEFINE_string("archive", None, "verify and unpack this local embeddings.zip instead of "
                    "downloading")
flags.DEFINE_float("timeout", 60.0, "seconds to wait for a connection or data")
flags.DEFINE_boolean("keep_archive", False, "keep <dest>/.download/embeddings.zip after "
                     "unpacking")
flags.DEFINE_boolean("clean", False, "remove <dest>/.download (a partial download) and exit")
FLAGS = flags.FLAGS


def interrupted():
  return (f"\ninterrupted; what was downloaded stays in {download.download_dir(FLAGS.dest)} "
          "and the next run resumes from it (--clean removes it); nothing partial was "
          "unpacked")


def main(argv):
  if len(argv) > 1:
    raise errors.ConfigError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.clean:
    download.clean(FLAGS.dest)
    return
  layout = download.install(
      FLAGS.dest, url=FLAGS.url, sha256=FLAGS.sha256, archive=FLAGS.archive,
      timeout=FLAGS.timeout, keep_archive=FLAGS.keep_archive)
  pairs = ", ".join(f"{d}/{c}" for d, c in sorted(layout))
  print(f"embeddings ready in {os.path.abspath(FLAGS.dest)} ({pairs}); "
        f"use --data_path {os.path.abspath(FLAGS.dest)}")


if __name__ == "__main__":
  console.run(main, where=lambda: FLAGS.dest, recovery="Nothing partial was unpacked.",
              location_flag="--dest", interrupted=interrupted)
