"""LEO-format embedding files: safe loading, validation and writing.

A split file `<data_path>/<dataset>/<crop>/<split>_embeddings.pkl` holds a dict
with `keys` (strings `<prefix>-<class>-<file>`, where the file name's part
before `_` equals the class) and `embeddings` (an n x D float array), as in
DeepMind's release (Python 2 pickles, read with encoding="latin1"). The same
data may also be stored as `<split>_embeddings.npz`, which cannot carry code.

Pickles are read with an allow-list unpickler: only dicts, lists, strings,
bytes, numbers and numpy arrays/dtypes can be built; any other global that a
file names is refused before it is imported or called.
"""

import dataclasses
import hashlib
import io
import os
import pickle
from typing import List, Optional, Sequence

import numpy as np

from leo_suite import errors
from leo_suite import fileio

SPLITS = ("train", "val", "test")
PICKLE_SUFFIX = "_embeddings.pkl"
NPZ_SUFFIX = "_embeddings.npz"

# Globals a released embeddings pickle needs (numpy arrays as written by
# Python 2 / numpy 1.x and by numpy 2.x); nothing else may be resolved.
_ALLOWED_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3 protocol-2 pickles spell bytes
    ("builtins", "bytes"), ("__builtin__", "bytes"),  # empty bytes, protocol 2
    ("builtins", "bytearray"), ("__builtin__", "bytearray"),
})
_LATIN1 = frozenset({"latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1"})


class _Guarded:
  """An allowed callable as the unpickler hands it out.

  It checks its arguments (no allocation by size, no other codec than latin1,
  arrays start empty as numpy's own pickles do) and cannot be modified by the
  pickle's BUILD opcode, so a file can neither call the real object in an
  unusual way nor tamper with numpy's functions for the rest of the process.
  """
  __slots__ = ("_name", "_function", "_check")

  def __init__(self, name, function, check):
    object.__setattr__(self, "_name", name)
    object.__setattr__(self, "_function", function)
    object.__setattr__(self, "_check", check)

  def __call__(self, *args):
    if not self._check(args):
      raise pickle.UnpicklingError(
          f"the file calls {self._name} with unexpected arguments "
          f"({', '.join(type(a).__name__ for a in args)}); refused")
    return self._function(*args)

  def __setattr__(self, name, value):
    raise pickle.UnpicklingError(f"the file tries to modify {self._name}; refused")

  def __setstate__(self, state):
    raise pickle.UnpicklingError(f"the file tries to modify {self._name}; refused")

  def __reduce__(self):
    raise TypeError("not picklable")


def _is_text(value):
  return isinstance(value, (str, bytes))


def _bytes_args(args):  # bytes() / bytes(text, 'latin1'), never bytes(size)
  return (not args or (_is_text(args[0]) and len(args) <= 2 and
                       all(isinstance(a, str) and a.lower() in _LATIN1 for a in args[1:])))


def _encode_args(args):  # _codecs.encode(text, 'latin1')
  return len(args) == 2 and isinstance(args[0], str) and str(args[1]).lower() in _LATIN1


def _real_global(module, name):
  module = module.replace("numpy.core.", "numpy._core.")
  imported = __import__(module, fromlist=[name])
  return getattr(imported, name)


_NDARRAY_TOKEN = _Guarded("numpy.ndarray", None, lambda args: False)


def _reconstruct_args(args):  # numpy's reduce: _reconstruct(ndarray, (0,), b'b')
  return (len(args) == 3 and args[0] is _NDARRAY_TOKEN and isinstance(args[1], tuple)
          and all(type(n) is int and n == 0 for n in args[1]) and _is_text(args[2]))


def _safe_globals():
  reconstruct = _real_global("numpy._core.multiarray", "_reconstruct")
  table = {
      "_reconstruct": _Guarded(
          "numpy multiarray._reconstruct",
          lambda subtype, shape, dtype: reconstruct(np.ndarray, shape, dtype),
          _reconstruct_args),
      "scalar": _Guarded("numpy multiarray.scalar",
                         _real_global("numpy._core.multiarray", "scalar"),
                         lambda args: 1 <= len(args) <= 2 and isinstance(args[0], np.dtype)),
      "_frombuffer": _Guarded("numpy numeric._frombuffer",
                              _real_global("numpy._core.numeric", "_frombuffer"),
                              lambda args: 4 <= len(args) <= 5 and isinstance(
                                  args[0], (bytes, bytearray))),
      "ndarray": _NDARRAY_TOKEN,
      "dtype": np.dtype,  # an immutable C type: BUILD cannot change it
      "encode": _Guarded("_codecs.encode", lambda text, _: text.encode("latin1"),
                         _encode_args),
      "bytes": _Guarded("bytes", bytes, _bytes_args),
      "bytearray": _Guarded("bytearray", bytearray, _bytes_args),
  }
  return {(module, name): table[name] for module, name in _ALLOWED_GLOBALS}


_SAFE_GLOBALS = _safe_globals()


class _AllowListUnpickler(pickle.Unpickler):
  """Unpickler that resolves only the globals in `_ALLOWED_GLOBALS`.

  A refused name is never imported or called, so nothing from the file runs.
  """

  def find_class(self, module, name):
    if (module, name) in _SAFE_GLOBALS:
      return _SAFE_GLOBALS[(module, name)]
    raise pickle.UnpicklingError(
        f"the file names the disallowed object {module}.{name}; embeddings "
        "files may only contain dicts, lists, strings and numpy arrays")


def safe_unpickle(payload: bytes):
  """Unpickles `payload` (Python 2 or 3) with the allow-list unpickler."""
  return _AllowListUnpickler(io.BytesIO(payload), encoding="latin1").load()


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
  """Returns the existing file for a split (.npz preferred), else the .pkl path."""
  stem = os.path.join(data_path, dataset_name, crop, split)
  npz = stem + NPZ_SUFFIX
  return npz if os.path.exists(npz) else stem + PICKLE_SUFFIX


def _decode_key(key, path, index):
  if isinstance(key, bytes):  # multiview pickles: keys come back as bytes
    return key.decode("latin1")
  if isinstance(key, (str, np.str_)):
    return str(key)
  raise errors.DataError(
      f"{path}: keys[{index}] is a {type(key).__name__}, expected a string "
      "like '<prefix>-<class>-<class>_<n>.JPEG'")


def parse_key(key: str, path: str, index: int):
  """Splits `<prefix>-<class>-<file>` into (class, file), checking the format."""
  fields = key.split("-")
  if len(fields) != 3 or not fields[1] or not fields[2]:
    raise errors.DataError(
        f"{path}: keys[{index}] = {key!r} is malformed: expected exactly "
        "three '-'-separated fields '<prefix>-<class>-<file>'")
  _, class_name, image_file = fields
  if image_file.split("_")[0] != class_name:
    raise errors.DataError(
        f"{path}: keys[{index}] = {key!r} is malformed: the file name "
        f"{image_file!r} should start with its class {class_name!r} followed by '_'")
  return class_name, image_file


def _one_line(exc, limit=300):
  """An exception's text on one line, at most `limit` characters."""
  text = " ".join(str(exc).split())
  return text if len(text) <= limit else text[:limit] + "..."


def _read_raw(path):
  """Returns (keys, embeddings) as read from a .pkl or .npz file."""
  if not os.path.exists(path):
    raise errors.DataError(f"{path}: no such file")
  with open(path, "rb") as handle:
    payload = handle.read()
  if path.endswith(".npz"):
    try:
      with np.load(io.BytesIO(payload), allow_pickle=False) as archive:
        contents = {name: archive[name] for name in archive.files}
    except ValueError as exc:  # object arrays need pickles: refused
      raise errors.DataError(f"{path}: {_one_line(exc)}") from None
    except Exception as exc:  # zipfile/format errors
      raise errors.DataError(
          f"{path}: not a readable .npz archive ({type(exc).__name__}: {_one_line(exc)}); "
          "the file may be truncated, re-create or re-download it") from None
  else:
    try:
      contents = safe_unpickle(payload)
    except pickle.UnpicklingError as exc:
      raise errors.DataError(f"{path}: refused or unreadable pickle: {_one_line(exc)}") from None
    except Exception as exc:  # pylint: disable=broad-except  # any malformed byte string
      raise errors.DataError(
          f"{path}: not a readable pickle ({type(exc).__name__}: {_one_line(exc)}); the "
          "file may be truncated or not an embeddings file: re-download it") from None
  if not isinstance(contents, dict):
    raise errors.DataError(
        f"{path}: expected a dict with 'keys' and 'embeddings', found a "
        f"{type(contents).__name__}")
  missing = [name for name in ("keys", "embeddings") if name not in contents]
  if missing:
    raise errors.DataError(
        f"{path}: the dict has no {' or '.join(repr(m) for m in missing)} entry "
        f"(found: {sorted(str(k) for k in contents)})")
  return contents["keys"], contents["embeddings"], payload


def _as_embedding_matrix(raw, path):
  if isinstance(raw, list):
    try:
      raw = np.asarray(raw)
    except ValueError:
      raise errors.DataError(f"{path}: 'embeddings' rows have different lengths") from None
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


def load_split(path: str) -> EmbeddingSplit:
  """Loads and validates one split file; raises `DataError` with the reason.

  Whatever the file holds, the only exception that leaves is a `DataError`
  naming the file (a hostile structure, e.g. nested a million levels deep,
  cannot surface as a RecursionError or TypeError traceback).
  """
  return _guarded(path, _load_split)


def read_keys_and_embeddings(path: str):
  """(keys as str, float32 [n, D]) in file order, validated as `load_split` does."""
  def read(p):
    keys, matrix, _, _, _ = _read_validated(p)
    return keys, matrix
  return _guarded(path, read)


def _guarded(path, reader):
  try:
    return reader(path)
  except errors.UserError:
    raise
  except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError,
          RecursionError, MemoryError, UnicodeError) as exc:
    raise errors.DataError(
        f"{path}: malformed embeddings file ({type(exc).__name__}: {_one_line(exc)}); "
        "expected a dict with 'keys' (n strings) and 'embeddings' (an n x D float "
        "array): re-create or re-download it") from None
  except OSError as exc:
    raise errors.DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _load_split(path: str) -> EmbeddingSplit:
  _, matrix, class_rows, image_names, payload = _read_validated(path)
  return _group_by_class(matrix, class_rows, image_names,
                         {path: hashlib.sha256(payload).hexdigest()})


def _read_validated(path):
  raw_keys, raw_embeddings, payload = _read_raw(path)
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
    keys.append(_decode_key(key, path, index))
    class_name, image_file = parse_key(keys[-1], path, index)
    if image_file in seen_files:
      raise errors.DataError(
          f"{path}: duplicate image {image_file!r} at keys[{seen_files[image_file]}] "
          f"and keys[{index}]; image names must be unique within a split")
    seen_files[image_file] = index
    class_rows.setdefault(class_name, []).append(index)
    image_names.append(image_file)
  return keys, matrix, class_rows, image_names, payload


def _group_by_class(matrix, class_rows, image_names, source):
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
  return _group_by_class(np.asarray(matrix, np.float32), class_rows,
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
        f"{sorted(overlap)[:5]}; train/val/test classes must be disjoint")
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
  return _group_by_class(matrix, class_rows, names, source)


def load_dataset_split(data_path: str, dataset_name: str, crop: str, split: str,
                       how_to_get: Optional[str] = None) -> EmbeddingSplit:
  """Loads `<data_path>/<dataset_name>/<crop>/<split>_embeddings.{npz,pkl}`."""
  path = split_path(data_path, dataset_name, crop, split)
  if not os.path.exists(path):
    hint = how_to_get or "check --data_path, --dataset_name and --embedding_crop"
    raise errors.DataError(
        f"{path}: no such file (nor {path[:-len(PICKLE_SUFFIX)] + NPZ_SUFFIX}); "
        f"embeddings for dataset {dataset_name!r}, crop {crop!r}, split "
        f"{split!r} are expected there. {hint}")
  return load_split(path)


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
            f"{sorted(shared)[:5]}; meta-train/val/test classes must be disjoint")


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


def make_key(class_name: str, index: int, prefix: str = "img", ext: str = "png") -> str:
  """Builds a release-style key `<prefix>-<class>-<class>_<index>.<ext>`."""
  if "-" in class_name or "_" in class_name or "-" in prefix or not class_name:
    raise ValueError(
        f"a class name may not contain '-' or '_' (and a prefix no '-'): "
        f"{class_name!r}, {prefix!r}")
  return f"{prefix}-{class_name}-{class_name}_{index:05d}.{ext}"
