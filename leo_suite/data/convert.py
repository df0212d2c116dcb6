"""Converting LEO-format embedding pickles to code-free `.npz` files.

A `.npz` holds two plain arrays (`keys` as unicode strings, `embeddings` as
float32 [n, D]) and is read with `allow_pickle=False`, so it cannot carry
code; the runner prefers `<split>_embeddings.npz` over the `.pkl` beside it.
Each pickle is read with the allow-list unpickler, validated, written
atomically, then read back and compared with the pickle row by row.
`scripts/convert_embeddings.py` is the command-line front end.
"""

import os

import numpy as np

from leo_suite import errors
from leo_suite.data import embeddings


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
