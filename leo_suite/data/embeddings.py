"""LEO-format embedding files: loading, validation, merging and writing.

A split file `<data_path>/<dataset>/<crop>/<split>_embeddings.pkl` holds a dict
with `keys` (strings `<prefix>-<class>-<file>`, where the file name's part
before `_` equals the class: `leo_suite.data.embedding_keys`) and
`embeddings` (an n x D float array), as in DeepMind's release (Python 2
pickles, read with encoding="latin1"). The same data may also be stored as
`<split>_embeddings.npz`, which cannot carry code.

Pickles are read by `leo_suite.data.safe_pickle`'s allow-list unpickler and
`.npz` members by `leo_suite.data.safe_arrays`, which builds every array only
once checked and within a memory budget; this module validates what they
return (one key per row, finite float rows, unique image names) and groups
the rows by class (`EmbeddingSplit`).
"""

import dataclasses
import hashlib
import io
import json
import os
import pickle
import sys
from typing import List, Optional, Sequence

import numpy as np

from leo_suite import errors
from leo_suite import fileio
from leo_suite import safeio
from leo_suite.data.embedding_keys import parse_key
from leo_suite.data.safe_arrays import Budget
from leo_suite.data.safe_arrays import materialise
from leo_suite.data.safe_arrays import max_array_bytes
from leo_suite.data.safe_arrays import read_npz
from leo_suite.data.safe_arrays import Refused
from leo_suite.data.safe_arrays import shorten
from leo_suite.data.safe_pickle import safe_unpickle

SPLITS = ("train", "val", "test")
PICKLE_SUFFIX = "_embeddings.pkl"
NPZ_SUFFIX = "_embeddings.npz"
MANIFEST = "manifest.json"  # written by extraction beside a <dataset>/<crop>'s files


@dataclasses.dataclass(frozen=True)
class EmbeddingSplit:
  """One split, its rows grouped by class.

  Attributes:
    embeddings: float32 [num_images, D], rows of a class contiguous.
    class_names: the class of each group, in order.
    class_start: int64 [num_classes], first row of each class.
    class_count: int64 [num_classes], images of each class (may differ).
    image_names: the file name of each row.
    source: the file(s) read, with their sha256.
  """
  embeddings: np.ndarray
  class_names: List[str]
  class_start: np.ndarray
  class_count: np.ndarray
  image_names: List[str]
  source: dict

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def dim(self) -> int:
    return int(self.embeddings.shape[1])


def split_path(data_path, dataset_name, crop, split):
  """Returns the existing file for a split (.npz preferred), else the .pkl path.

  The dataset, crop and split names are single folder / file names
  (safeio.check_name): a name never leads outside `data_path`.
  """
  for value, what in ((dataset_name, "--dataset_name"), (crop, "--embedding_crop"),
                      (split, "split name")):
    safeio.check_name(value, what, errors.ConfigError)
  stem = os.path.join(data_path, dataset_name, crop, split)
  npz = stem + NPZ_SUFFIX
  return npz if os.path.exists(npz) else stem + PICKLE_SUFFIX


def decode_key(key, path, index):
  if isinstance(key, bytes):  # multiview pickles: keys come back as bytes
    return key.decode("latin1")
  if isinstance(key, (str, np.str_)):
    return str(key)
  raise errors.DataError(
      f"{path}: keys[{index}] is a {type(key).__name__}, expected a string "
      "like '<prefix>-<class>-<class>_<n>.JPEG'")


def read_raw(path, cap):
  """(keys, embeddings, file bytes) of a .pkl or .npz file, built within a `Budget`.

  Only a regular file is read (safeio.open_regular: a FIFO or a link to a
  device is refused before any byte is read); its size is checked by the
  `Budget`, with the loader's cap and message, and no more than that size is read.
  """
  with safeio.open_regular(path, max_bytes=sys.maxsize) as handle:  # size: the Budget's
    size = os.fstat(handle.fileno()).st_size
    budget = Budget(path, size, cap)
    payload = handle.read(size)   # one buffer; bytes appended since are not read
  kind = ".npz archive" if path.endswith(".npz") else "pickle"
  try:
    contents = read_npz(payload, budget) if kind == ".npz archive" else safe_unpickle(payload)
    if not isinstance(contents, dict):
      raise errors.DataError(
          f"{path}: expected a dict with 'keys' and 'embeddings', found a "
          f"{type(contents).__name__}")
    missing = [name for name in ("keys", "embeddings") if name not in contents]
    if missing:
      raise errors.DataError(
          f"{path}: the dict has no {' or '.join(repr(m) for m in missing)} entry "
          f"(found: {shorten(list(contents))})")
    keys = materialise(contents["keys"], budget)
    return keys, materialise(contents["embeddings"], budget), payload
  except errors.UserError:
    raise
  except Refused as exc:
    raise errors.DataError(
        f"{path}: {shorten(exc, 600)}. Re-create the file from trusted data") from None
  except Exception as exc:  # pylint: disable=broad-except  # any malformed byte string
    raise errors.DataError(
        f"{path}: not a readable {kind} ({type(exc).__name__}: {shorten(exc, 300)}); the "
        "file may be truncated or not an embeddings file: re-create or re-download it") from None


_NUMBERS = (int, float, np.integer, np.floating)


def _rows_to_array(rows, path):
  """A list of n rows of D numbers (lists or 1-D numeric arrays), checked before numpy sees it."""
  for index, row in enumerate(rows):
    if isinstance(row, np.ndarray):
      numeric = row.ndim == 1 and row.dtype.kind in "iuf"
    else:
      numeric = isinstance(row, (list, tuple)) and all(
          isinstance(x, _NUMBERS) and not isinstance(x, bool) for x in row)
    if not numeric:
      raise errors.DataError(
          f"{path}: 'embeddings' row {index} is {shorten(row)}, expected a row of D numbers")
    if len(row) != len(rows[0]):
      raise errors.DataError(f"{path}: 'embeddings' rows have different lengths")
  return np.asarray(rows)


def _as_embedding_matrix(raw, path):
  if isinstance(raw, list):
    raw = _rows_to_array(raw, path)
  if not isinstance(raw, np.ndarray):
    raise errors.DataError(
        f"{path}: 'embeddings' is a {type(raw).__name__}, expected an n x D array")
  if raw.dtype == object or not (np.issubdtype(raw.dtype, np.floating) or
                                 np.issubdtype(raw.dtype, np.integer)):
    raise errors.DataError(
        f"{path}: 'embeddings' has dtype {raw.dtype}, expected a float array")
  if raw.ndim != 2 or raw.shape[1] == 0:
    raise errors.DataError(
        f"{path}: 'embeddings' has shape {raw.shape}, expected (n, D) with D > 0")
  matrix = raw.astype(np.float32)
  bad_rows = np.flatnonzero(~np.isfinite(matrix).all(axis=1))
  if bad_rows.size:
    raise errors.DataError(
        f"{path}: 'embeddings' has {bad_rows.size} row(s) with NaN or inf "
        f"(first at row {bad_rows[0]}); nothing will be trained on this file")
  return matrix


def load_split(path: str, max_bytes: Optional[int] = None) -> EmbeddingSplit:
  """Loads and validates one split file; raises `DataError` with the reason.

  Whatever the file holds, the only exception that leaves is a `DataError`
  naming the file (a hostile structure, e.g. nested a million levels deep,
  cannot surface as a RecursionError or TypeError traceback). `max_bytes`
  overrides the memory cap of `max_array_bytes`.
  """
  return guarded(path, _load_split, max_bytes)


def read_keys_and_embeddings(path: str, max_bytes: Optional[int] = None):
  """(keys as str, float32 [n, D]) in file order, validated as `load_split` does."""
  def read(p, cap):
    keys, matrix, _, _, _ = _read_validated(p, cap)
    return keys, matrix
  return guarded(path, read, max_bytes)


def guarded(path, reader, max_bytes, shape="an n x D"):
  """reader(path, cap)'s result; any failure a `DataError` naming `path`."""
  try:
    return reader(path, max_array_bytes(max_bytes))
  except errors.UserError:
    raise
  except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError,
          RecursionError, MemoryError, UnicodeError) as exc:
    raise errors.DataError(
        f"{path}: malformed embeddings file ({type(exc).__name__}: {shorten(exc, 300)}); "
        f"expected a dict with 'keys' (n strings) and 'embeddings' ({shape} float "
        "array): re-create or re-download it") from None
  except OSError as exc:
    raise errors.DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _load_split(path: str, cap: int) -> EmbeddingSplit:
  _, matrix, class_rows, image_names, payload = _read_validated(path, cap)
  return group_by_class(matrix, class_rows, image_names,
                         {path: hashlib.sha256(payload).hexdigest()})


def _read_validated(path, cap):
  raw_keys, raw_embeddings, payload = read_raw(path, cap)
  matrix = _as_embedding_matrix(raw_embeddings, path)
  if isinstance(raw_keys, np.ndarray):
    if raw_keys.ndim != 1:
      raise errors.DataError(f"{path}: 'keys' has shape {raw_keys.shape}, expected (n,)")
    raw_keys = raw_keys.tolist()
  if not isinstance(raw_keys, (list, tuple)):
    raise errors.DataError(f"{path}: 'keys' is a {type(raw_keys).__name__}, expected a list")
  if len(raw_keys) != matrix.shape[0]:
    raise errors.DataError(
        f"{path}: {len(raw_keys)} keys but {matrix.shape[0]} embedding rows; "
        "each row needs exactly one key")
  if not raw_keys:
    raise errors.DataError(f"{path}: the split is empty (no keys)")
  class_rows = {}
  image_names = []
  seen_files = {}
  keys = []
  for index, key in enumerate(raw_keys):
    keys.append(decode_key(key, path, index))
    class_name, image_file = parse_key(keys[-1], path, index)
    if image_file in seen_files:
      raise errors.DataError(
          f"{path}: duplicate image {shorten(image_file)} at keys[{seen_files[image_file]}] "
          f"and keys[{index}]; image names must be unique within a split")
    seen_files[image_file] = index
    class_rows.setdefault(class_name, []).append(index)
    image_names.append(image_file)
  return keys, matrix, class_rows, image_names, payload


def group_by_class(matrix, class_rows, image_names, source):
  class_names = sorted(class_rows)
  order = np.concatenate([np.asarray(class_rows[c], np.int64) for c in class_names])
  counts = np.asarray([len(class_rows[c]) for c in class_names], np.int64)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
  return EmbeddingSplit(
      embeddings=np.ascontiguousarray(matrix[order]),
      class_names=class_names,
      class_start=starts,
      class_count=counts,
      image_names=[image_names[i] for i in order],
      source=source)


def split_from_labels(matrix, labels, class_names=None, source=None) -> EmbeddingSplit:
  """An in-memory split from features [n, D] and integer labels [n]."""
  labels = np.asarray(labels)
  names = class_names or [str(c) for c in range(int(labels.max()) + 1)]
  class_rows = {names[c]: np.flatnonzero(labels == c).tolist() for c in np.unique(labels)}
  return group_by_class(np.asarray(matrix, np.float32), class_rows,
                         [str(i) for i in range(len(labels))], source or {"memory": ""})


def merge_splits(parts: Sequence[EmbeddingSplit]) -> EmbeddingSplit:
  """Concatenates splits (e.g. train + val for `--train_on_val`)."""
  dims = {p.dim for p in parts}
  if len(dims) != 1:
    raise errors.DataError(
        f"cannot merge splits of different widths {sorted(dims)}: "
        f"{[list(p.source) for p in parts]}")
  overlap = set.intersection(*[set(p.class_names) for p in parts]) if len(parts) > 1 else set()
  if overlap:
    raise errors.DataError(
        f"splits {[list(p.source) for p in parts]} share classes "
        f"{shorten(sorted(overlap)[:5])}; train/val/test classes must be disjoint")
  matrix = np.concatenate([p.embeddings for p in parts])
  class_rows, offset = {}, 0
  names = []
  for part in parts:
    for name, start, count in zip(part.class_names, part.class_start, part.class_count):
      class_rows[name] = list(range(offset + start, offset + start + count))
    names.extend(part.image_names)
    offset += part.embeddings.shape[0]
  source = {}
  for part in parts:
    source.update(part.source)
  return group_by_class(matrix, class_rows, names, source)


def load_dataset_split(data_path: str, dataset_name: str, crop: str, split: str,
                       how_to_get: Optional[str] = None,
                       max_bytes: Optional[int] = None) -> EmbeddingSplit:
  """Loads `<data_path>/<dataset_name>/<crop>/<split>_embeddings.{npz,pkl}`."""
  path = split_path(data_path, dataset_name, crop, split)
  folder = os.path.dirname(path)
  if not os.path.exists(folder) and os.path.isdir(folder + ".old"):
    raise errors.DataError(
        f"{folder} is missing but {folder}.old holds the previous extraction: an extraction "
        "was killed while switching it in; rerun it (it restores the old one first), or "
        f"rename {folder}.old back to {folder}")
  if not os.path.exists(path):
    hint = how_to_get or "check --data_path, --dataset_name and --embedding_crop"
    raise errors.DataError(
        f"{path}: no such file (nor {path[:-len(PICKLE_SUFFIX)] + NPZ_SUFFIX}); "
        f"embeddings for dataset {dataset_name!r}, crop {crop!r}, split "
        f"{split!r} are expected there. {hint}")
  loaded = load_split(path, max_bytes)
  check_listed(path, split, loaded.source[path])
  return loaded


def check_listed(path: str, split: str, sha256: str):
  """Refuses a split file other than the one the extraction manifest beside it lists.

  Extraction writes one generation (the split files, then `MANIFEST` with its
  `generation` id and each file's sha256) into a staging folder it renames in
  whole: a file whose sha256 differs comes from another extraction (copied in,
  or an old version's interrupted run), and mixing it with the others would
  pair splits of two backbones or image sets. Without a manifest, or one not
  listing this file (the release, a converted file), nothing is checked.
  """
  manifest = os.path.join(os.path.dirname(path), MANIFEST)
  if not os.path.lexists(manifest):
    return
  with safeio.open_regular(manifest) as handle:   # a FIFO is refused, not read
    try:
      entry = json.load(handle)["splits"][split]
      listed, expected = entry["file"], entry["sha256"]
    except (ValueError, KeyError, TypeError):
      return   # not an extraction manifest, or no entry for this split
  if listed == os.path.basename(path) and expected != sha256:
    raise errors.DataError(
        f"{path}: not the file {manifest} lists for {split} (its sha256 is "
        f"{str(sha256)[:12]}..., the manifest's {str(expected)[:12]}...): split files of two "
        "extractions are mixed (one was interrupted, or files were copied in); extract "
        "again into this folder, or move the files of one extraction elsewhere")


def check_compatible(splits: Sequence[EmbeddingSplit]):
  """All splits of a run must share D and have disjoint classes."""
  dims = {s.dim for s in splits}
  if len(dims) != 1:
    raise errors.DataError(
        "the splits have different embedding widths: " +
        ", ".join(f"{list(s.source)[0]}: D={s.dim}" for s in splits))
  for i, a in enumerate(splits):
    for b in splits[i + 1:]:
      shared = set(a.class_names) & set(b.class_names)
      if shared:
        raise errors.DataError(
            f"{list(a.source)[0]} and {list(b.source)[0]} share classes "
            f"{shorten(sorted(shared)[:5])}; meta-train/val/test classes must be disjoint")


def write_split(path: str, keys: Sequence[str], embeddings: np.ndarray):
  """Writes a split atomically; `.npz` paths get the code-free format."""
  embeddings = np.asarray(embeddings, np.float32)
  keys = [str(k) for k in keys]
  if embeddings.ndim != 2 or embeddings.shape[0] != len(keys):
    raise ValueError(f"need n keys and an (n, D) array, got {len(keys)} and {embeddings.shape}")
  for index, key in enumerate(keys):
    parse_key(key, path, index)
  if path.endswith(".npz"):
    buffer = io.BytesIO()
    np.savez(buffer, keys=np.asarray(keys, dtype=np.str_), embeddings=embeddings)
    payload = buffer.getvalue()
  else:
    payload = pickle.dumps({"keys": np.asarray(keys, dtype=object),
                            "embeddings": embeddings}, protocol=2)
  fileio.atomic_write_bytes(path, payload)
