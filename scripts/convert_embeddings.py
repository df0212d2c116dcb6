"""Converts LEO-format embedding pickles to `.npz` (keys + embeddings, no code).

  python scripts/convert_embeddings.py --input=embeddings/miniImageNet/center/train_embeddings.pkl
  python scripts/convert_embeddings.py --data_path=embeddings          # every *_embeddings.pkl

A `.npz` holds two plain arrays (`keys` as unicode strings, `embeddings` as
float32 [n, D]) and is read with `allow_pickle=False`, so it cannot carry
code; the runner prefers `<split>_embeddings.npz` over the `.pkl` beside it.
Each pickle is read with the allow-list unpickler (a hostile file is refused,
nothing from it runs), validated, written atomically (temporary file +
rename: a killed conversion leaves no partial `.npz`), then read back and
compared with the pickle row by row before the next file starts. Outputs stay
beside their inputs (under --data_path in tree mode); symbolic links are not
followed.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from leo_suite import errors  # pylint: disable=wrong-import-position
from leo_suite.data import embeddings  # pylint: disable=wrong-import-position
from leo_suite.pretrain import cli  # pylint: disable=wrong-import-position

flags.DEFINE_string("input", None, "One <split>_embeddings.pkl to convert.")
flags.DEFINE_string("output", None, "Where to write it (default: the input with .npz).")
flags.DEFINE_string("data_path", None, "Convert every *_embeddings.pkl under this tree.")
flags.DEFINE_boolean("remove_pickles", False,
                     "Delete each pickle once its .npz has been verified.")
FLAGS = flags.FLAGS


def output_for(pickle_path):
  return pickle_path[:-len(".pkl")] + ".npz"


def convert_file(pickle_path, npz_path=None, remove_pickle=False, log=print):
  """Converts one pickle; returns the .npz path after a verified round trip."""
  npz_path = npz_path or output_for(pickle_path)
  if not pickle_path.endswith(".pkl"):
    raise errors.ConfigError(f"--input={pickle_path}: expected a .pkl file")
  if not npz_path.endswith(".npz"):
    raise errors.ConfigError(f"--output={npz_path}: the output must end in .npz")
  if os.path.abspath(npz_path) == os.path.abspath(pickle_path):
    raise errors.ConfigError(f"{npz_path}: the output would overwrite the input")
  keys, matrix = embeddings.read_keys_and_embeddings(pickle_path)
  embeddings.write_split(npz_path, keys, matrix)
  verify(pickle_path, npz_path)
  log(f"converted {pickle_path} -> {npz_path} ({matrix.shape[0]} rows, D={matrix.shape[1]}, "
      f"verified)")
  if remove_pickle:
    os.remove(pickle_path)
  return npz_path


def verify(pickle_path, npz_path):
  """Raises `DataError` unless both files hold the same keys and rows, in order."""
  keys_a, rows_a = embeddings.read_keys_and_embeddings(pickle_path)
  keys_b, rows_b = embeddings.read_keys_and_embeddings(npz_path)
  if keys_a != keys_b or rows_a.shape != rows_b.shape or not np.array_equal(rows_a, rows_b):
    raise errors.DataError(
        f"{npz_path}: does not read back as {pickle_path} (keys or rows differ); "
        "the disk may be faulty, delete the .npz and rerun")
  a, b = embeddings.load_split(pickle_path), embeddings.load_split(npz_path)
  if a.class_names != b.class_names or a.image_names != b.image_names:
    raise errors.DataError(f"{npz_path}: classes differ from {pickle_path}")


def find_pickles(data_path):
  """Every `*_embeddings.pkl` under `data_path` (links not followed), sorted."""
  if not os.path.isdir(data_path):
    raise errors.DataError(f"--data_path={data_path}: no such directory")
  found = []
  for directory, subdirs, files in os.walk(data_path, followlinks=False):
    subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
    for name in sorted(files):
      path = os.path.join(directory, name)
      if name.endswith(embeddings.PICKLE_SUFFIX) and not os.path.islink(path):
        found.append(path)
  if not found:
    raise errors.DataError(f"--data_path={data_path}: no *{embeddings.PICKLE_SUFFIX} files")
  return found


def convert_tree(data_path, remove_pickles=False, log=print):
  return [convert_file(p, remove_pickle=remove_pickles, log=log) for p in find_pickles(data_path)]


def main(argv):
  if len(argv) > 1:
    raise errors.ConfigError(f"unexpected arguments {argv[1:]}")
  if bool(FLAGS.input) == bool(FLAGS.data_path):
    raise errors.ConfigError("give exactly one of --input=<file.pkl> or --data_path=<tree>")
  if FLAGS.data_path and FLAGS.output:
    raise errors.ConfigError("--output applies to --input only")
  try:
    if FLAGS.data_path:
      outputs = convert_tree(FLAGS.data_path, FLAGS.remove_pickles)
      print(f"{len(outputs)} file(s) converted under {FLAGS.data_path}")
    else:
      convert_file(FLAGS.input, FLAGS.output, FLAGS.remove_pickles)
  except OSError as exc:  # disk full, permissions: the previous files are intact
    raise errors.DataError(
        f"{exc.filename or 'output'}: {exc.strerror or exc}; nothing half-written was "
        "left behind, fix this and rerun") from None


if __name__ == "__main__":
  cli.run(main)
