"""LEO-format embedding files: safe loading, validation and writing.

A split file `<data_path>/<dataset>/<crop>/<split>_embeddings.pkl` holds a dict
with `keys` (strings `<prefix>-<class>-<file>`, where the file name's part
before `_` equals the class) and `embeddings` (an n x D float array), as in
DeepMind's release (Python 2 pickles, read with encoding="latin1"). The same
data may also be stored as `<split>_embeddings.npz`, which cannot carry code.

Nothing from a file reaches numpy but validated, plain descriptions. Pickles
are read with an allow-list unpickler whose few globals (numpy's array, dtype
and scalar reconstructors, latin1 bytes) are stand-ins: they record a dtype
string, a shape and raw bytes (or a list of elements), which are checked (a
short list of plain dtypes; shape x itemsize equal to the bytes present) and
only then built with `np.frombuffer` or element by element. The
headers of `.npz` members are parsed here too. Every array, list and string
is counted against a memory budget before it is allocated (`_Budget`,
`max_array_bytes`), and values quoted in messages are shortened (`_short`).
"""

import ast
import dataclasses
import hashlib
import io
import math
import os
import pickle
import re
import reprlib
import struct
import zipfile
from typing import List, Optional, Sequence

import numpy as np

from leo_suite import errors
from leo_suite import fileio

SPLITS = ("train", "val", "test")
PICKLE_SUFFIX = "_embeddings.pkl"
NPZ_SUFFIX = "_embeddings.npz"

MAX_ARRAY_BYTES = 4 * 2**30  # default cap on what one file's arrays may take
MAX_ARRAY_BYTES_ENV = "LEO_SUITE_MAX_ARRAY_BYTES"
EXPANSION_LIMIT = 256  # ... and at most this many times the file's own size
_MAX_DEPTH = 16  # lists / object arrays nested in 'keys' or 'embeddings'
_MAX_NDIM = 32
_MAX_NPY_HEADER = 10000  # bytes, as numpy's own reader
_READ_CHUNK = 2**24
_TEXT_LIMIT = 200  # characters of a file's value quoted in a message


class _ShortRepr(reprlib.Repr):
  """A repr that stays short without first building the long one."""

  def __init__(self):
    super().__init__()
    self.maxlevel, self.maxstring, self.maxother = 3, 80, 80
    self.maxlist = self.maxtuple = self.maxdict = self.maxset = 4

  def repr_int(self, x, level):  # repr() of a 100k-digit int would raise
    return super().repr_int(x, level) if x.bit_length() < 256 else f"<{x.bit_length()}-bit int>"

  def repr_ndarray(self, x, level):
    return f"<{x.dtype} array of shape {x.shape}>"


_REPR = _ShortRepr()


def _short(value, limit=_TEXT_LIMIT):
  """`value` for a message (its repr, or an exception's text): one line, <= `limit` chars."""
  text = str(value) if isinstance(value, BaseException) else _REPR.repr(value)
  text = " ".join(text.split())
  return text if len(text) <= limit else text[:limit - 3] + "..."


class _Refused(ValueError):
  """The file describes something the loader will not build; the text says what."""


def max_array_bytes(override: Optional[int] = None) -> int:
  """The cap on one file's arrays: `override`, else $LEO_SUITE_MAX_ARRAY_BYTES, else 4 GiB."""
  source, value = (("max_bytes", override) if override is not None else
                   (MAX_ARRAY_BYTES_ENV, os.environ.get(MAX_ARRAY_BYTES_ENV) or None))
  if value is None:
    return MAX_ARRAY_BYTES
  try:
    cap = int(value)
  except (TypeError, ValueError):
    cap = 0
  if cap <= 0:
    raise errors.ConfigError(
        f"{source}={_short(value)}: expected a positive number of bytes (default "
        f"{MAX_ARRAY_BYTES})")
  return cap


class _Budget:
  """Bytes one file may make the loader allocate, counted before each allocation.

  The limit is the cap and `EXPANSION_LIMIT` times the file's size: a genuine
  file stores every element it holds, while a memoised row referenced 10,000
  times or a zip bomb expands far more. Built objects are kept by id, so a
  repeated reference costs its full size again but is not rebuilt.
  """

  def __init__(self, path, file_size, cap):
    self.path, self.cap, self.file_size = path, cap, file_size
    self.limit = min(cap, EXPANSION_LIMIT * file_size + 2**20)
    self.spent = 0
    self.built = {}  # id(stand-in or list) -> (built value, bytes), None while building
    if file_size > cap:
      self._refuse(file_size, "the file itself")

  def spend(self, nbytes, what):
    self.spent += nbytes
    if self.spent > self.limit:
      self._refuse(self.spent, what)

  def _refuse(self, total, what):
    if self.limit == self.cap or total > self.cap:
      why = (f"more than the cap of {self.cap:,} bytes; if the file is genuine, set "
             f"{MAX_ARRAY_BYTES_ENV} higher")
    else:
      why = (f"more than {EXPANSION_LIMIT} times the file's {self.file_size:,} bytes: it "
             "repeats one object many times or is a compression bomb; re-create it")
    raise errors.DataError(
        f"{self.path}: refused before allocating: its contents would take {total:,} bytes "
        f"of memory (counting {what}), {why}")


# -- dtypes a file may name -----------------------------------------------------------
_DESCR = re.compile(r"([<>|=]?)([biufSUO])([0-9]{1,10})?")
_NUMERIC_SIZES = {"b": (1,), "i": (1, 2, 4, 8), "u": (1, 2, 4, 8), "f": (2, 4, 8)}


def _plain_dtype(descr, byteorder=None, itemsize=None, allow_object=True):
  """The dtype for a descr string such as '<f4', '|S7', 'U7' or 'O8'; `_Refused` otherwise.

  `byteorder` and `itemsize` (bytes) come from a pickled dtype's state and take
  precedence. Only bool, integer, float, bytes and str dtypes (and object, for
  arrays built element by element) exist here: no void, structured, subarray,
  datetime or flags.
  """
  match = _DESCR.fullmatch(descr) if isinstance(descr, str) else None
  if match is None or (match.group(2) == "O" and not allow_object):
    raise _Refused(
        f"the file describes an array of dtype {_short(descr)}; only plain bool, integer, "
        "float, bytes and str arrays (and, in pickles, object arrays of keys) are loaded")
  order, kind, digits = match.groups()
  order = byteorder or order
  order = order if order in ("<", ">") else "="
  size = int(digits or 0) if itemsize in (None, -1) else itemsize
  if kind == "O":
    return np.dtype(object)
  if kind in _NUMERIC_SIZES and size in _NUMERIC_SIZES[kind]:
    return np.dtype(f"{order}{kind}{size}")
  if kind == "U" and itemsize not in (None, -1):
    size = size // 4 if size % 4 == 0 else 0  # the state counts bytes, the string characters
  if kind in "SU" and size > 0:
    return np.dtype(f"{order}{kind}{size}")
  raise _Refused(f"the file describes an array of dtype {descr!r} with {size} bytes per item")


class _DtypePlan:
  """Stand-in for `numpy.dtype(descr, align, copy)` and its BUILD state."""
  __slots__ = ("descr", "byteorder", "itemsize")

  def __init__(self, descr, align=False, copy=True):  # pylint: disable=unused-argument
    _plain_dtype(descr)
    self.descr, self.byteorder, self.itemsize = descr, None, None

  def __setstate__(self, state):
    # numpy's: (3 or 4, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata])
    plain = (isinstance(state, tuple) and len(state) in (8, 9) and state[0] in (3, 4) and
             state[1] in ("<", ">", "|", "=") and state[2:5] == (None, None, None) and
             all(type(n) is int for n in state[5:8]) and state[8:] in ((), (None,)))
    if not plain or self.byteorder is not None:
      raise _Refused(
          f"the file gives dtype {self.descr!r} the state {_short(state)}; only a byte order "
          "and an item size are accepted, once (no subarray, fields or metadata)")
    self.byteorder, self.itemsize = state[1], state[5]
    self.resolve()

  def resolve(self):
    return _plain_dtype(self.descr, self.byteorder, self.itemsize)

  def __repr__(self):
    return f"dtype({self.descr!r})"


def _shape(value):
  if not (isinstance(value, tuple) and len(value) <= _MAX_NDIM and
          all(type(n) is int and n >= 0 for n in value)):
    raise _Refused(f"the file gives an array the shape {_short(value)}; expected a tuple of sizes")
  return value


class _ArrayPlan:
  """Stand-in for an array from `_reconstruct` + BUILD or `_frombuffer`; see `build`."""
  __slots__ = ("data", "dtype", "shape", "order", "axes")

  def __init__(self, data=None, dtype=None, shape=(), order="C", axes=None):
    self.data, self.dtype = None, None
    if data is not None:
      self._set(data, dtype, shape, order, axes)

  def __setstate__(self, state):  # numpy's: ([1,] shape, dtype, fortran, data)
    if isinstance(state, tuple) and len(state) == 5 and type(state[0]) is int and state[0] == 1:
      state = state[1:]
    if not (isinstance(state, tuple) and len(state) == 4 and state[2] in (0, 1)):
      raise _Refused(f"the file gives an array the state {_short(state)}; refused")
    shape, dtype, fortran, data = state
    self._set(data, dtype, shape, "F" if fortran else "C", None)

  def _set(self, data, dtype, shape, order, axes):
    if self.dtype is not None:
      raise _Refused("the file sets an array's contents twice; refused")
    shape = _shape(shape)
    if not (isinstance(dtype, _DtypePlan) and isinstance(data, (bytes, bytearray, str, list))
            and (order in ("C", "F") and axes is None or order == "K" and
                 isinstance(axes, tuple) and sorted(axes) == list(range(len(shape))))):
      raise _Refused(
          f"the file describes an array as {_short((dtype, shape, order, axes))} with "
          f"{type(data).__name__} data; refused")
    self.data, self.dtype, self.shape, self.order, self.axes = data, dtype, shape, order, axes

  def build(self, budget, depth):
    """The array, once its size matches the data present and fits `budget`."""
    if self.dtype is None:
      raise _Refused("the file leaves an array without contents")
    dtype, count = self.dtype.resolve(), math.prod(self.shape)
    if isinstance(self.data, list) != (dtype == object):
      raise _Refused(f"the file gives {type(self.data).__name__} data for a {dtype} array "
                     "(object arrays list their elements, others give raw bytes); refused")
    if isinstance(self.data, list):
      if len(self.data) != count:
        raise _Refused(f"the file gives {len(self.data):,} elements for an object array of "
                       f"shape {self.shape}")
      budget.spend(8 * count, "an object array")
      array = np.empty(count, dtype=object)
      for index, item in enumerate(self.data):
        array[index] = _materialise(item, budget, depth + 1)
    else:
      raw = self.data.encode("latin1") if isinstance(self.data, str) else self.data
      if count * dtype.itemsize != len(raw):
        raise _Refused(f"the file describes a {dtype} array of shape {self.shape} "
                       f"({count * dtype.itemsize:,} bytes) but gives {len(raw):,} bytes")
      budget.spend(len(raw), "an array")
      array = np.frombuffer(raw, dtype)  # read-only if `raw` is bytes: callers copy
    if self.axes is not None:
      return array.reshape(self.shape).transpose(self.axes)
    return array.reshape(self.shape, order=self.order)

  def __repr__(self):
    return "<array>"


def _scalar(dtype, data):
  """numpy's `scalar(dtype, raw)` for a plain dtype and exactly itemsize bytes."""
  dtype = dtype.resolve()
  raw = data.encode("latin1") if isinstance(data, str) else data
  if dtype == object or len(raw) != dtype.itemsize:
    raise _Refused(f"the file asks for a {dtype} scalar from {len(raw):,} bytes; refused")
  return np.frombuffer(raw, dtype)[0]


def _materialise(value, budget, depth=0):
  """`value` with its stand-ins built and its size counted against `budget`."""
  if isinstance(value, (str, bytes, bytearray)):
    budget.spend(len(value), "a string")
  if not isinstance(value, (list, tuple, _ArrayPlan)):
    return value
  if depth > _MAX_DEPTH:
    raise _Refused(f"'keys' or 'embeddings' is nested more than {_MAX_DEPTH} levels deep")
  if id(value) in budget.built:  # a memo reference: counted in full, built once
    if budget.built[id(value)] is None:
      raise _Refused("'keys' or 'embeddings' contains itself")
    built, size = budget.built[id(value)]
    budget.spend(size, "a repeated reference")
    return built
  budget.built[id(value)] = None
  start = budget.spent
  if isinstance(value, _ArrayPlan):
    built = value.build(budget, depth)
  else:
    budget.spend(8 * len(value), "a list")
    built = type(value)(_materialise(item, budget, depth + 1) for item in value)
  budget.built[id(value)] = (built, budget.spent - start)
  return built


# -- the allow-list unpickler -----------------------------------------------------------
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
  """An allowed global as the unpickler hands it out: a stand-in callable.

  It checks the shape of its arguments before calling `function` (which only
  records or validates) and cannot be modified by the pickle's BUILD opcode.
  """
  __slots__ = ("_name", "_function", "_check")

  def __init__(self, name, function, check):
    object.__setattr__(self, "_name", name)
    object.__setattr__(self, "_function", function)
    object.__setattr__(self, "_check", check)

  def __call__(self, *args):
    if not self._check(args):
      raise _Refused(
          f"the file calls {self._name} with unexpected arguments "
          f"({_short(', '.join(type(a).__name__ for a in args))}); refused")
    return self._function(*args)

  def __setattr__(self, name, value):
    raise _Refused(f"the file tries to modify {self._name}; refused")

  def __setstate__(self, state):
    raise _Refused(f"the file tries to modify {self._name}; refused")

  def __reduce__(self):
    raise TypeError("not picklable")


def _is_text(value):
  return isinstance(value, (str, bytes))


def _bytes_args(args):  # bytes() / bytes(text, 'latin1'), never bytes(size)
  return (not args or (_is_text(args[0]) and len(args) <= 2 and
                       all(isinstance(a, str) and a.lower() in _LATIN1 for a in args[1:])))


def _encode_args(args):  # _codecs.encode(text, 'latin1')
  return len(args) == 2 and isinstance(args[0], str) and str(args[1]).lower() in _LATIN1


_NDARRAY_TOKEN = _Guarded("numpy.ndarray", None, lambda args: False)


def _reconstruct_args(args):  # numpy's reduce: _reconstruct(ndarray, (0,), b'b')
  return (len(args) == 3 and args[0] is _NDARRAY_TOKEN and isinstance(args[1], tuple)
          and all(type(n) is int and n == 0 for n in args[1]) and _is_text(args[2]))


def _safe_globals():
  table = {
      "_reconstruct": _Guarded("numpy multiarray._reconstruct", lambda *_: _ArrayPlan(),
                               _reconstruct_args),
      "scalar": _Guarded("numpy multiarray.scalar", _scalar, lambda args: len(args) == 2 and (
          isinstance(args[0], _DtypePlan) and _is_text(args[1]))),
      "_frombuffer": _Guarded("numpy numeric._frombuffer", _ArrayPlan, lambda args: (
          4 <= len(args) <= 5 and isinstance(args[0], (bytes, bytearray)))),
      "ndarray": _NDARRAY_TOKEN,
      "dtype": _Guarded("numpy.dtype", _DtypePlan, lambda args: (
          1 <= len(args) <= 3 and isinstance(args[0], str) and
          all(type(a) in (bool, int) and a in (0, 1) for a in args[1:]))),
      "encode": _Guarded("_codecs.encode", lambda text, _: text.encode("latin1"),
                         _encode_args),
      "bytes": _Guarded("bytes", bytes, _bytes_args),
      "bytearray": _Guarded("bytearray", bytearray, _bytes_args),
  }
  return {(module, name): table[name] for module, name in _ALLOWED_GLOBALS}


_SAFE_GLOBALS = _safe_globals()


class _AllowListUnpickler(pickle._Unpickler):  # pylint: disable=protected-access
  """Unpickler that resolves only the globals in `_ALLOWED_GLOBALS`, to stand-ins.

  A refused name is never imported or called, so nothing from the file runs.
  It is the pure-Python unpickler: its memo is a dict, where the C one
  allocates an array as long as the largest memo index a file names (a
  10-byte file can ask for 32 GB).
  """

  def find_class(self, module, name):
    if (module, name) in _SAFE_GLOBALS:
      return _SAFE_GLOBALS[(module, name)]
    raise _Refused(
        f"the file names the disallowed object {_short(f'{module}.{name}')}; embeddings "
        "files may only contain dicts, lists, strings and numpy arrays")

  def load_bytearray8(self):  # the base zero-fills the declared size before reading
    (size,) = struct.unpack("<Q", self.read(8))
    data = self.read(size)
    if len(data) != size:
      raise pickle.UnpicklingError("pickle data was truncated")
    self.append(bytearray(data))

  dispatch = {**pickle._Unpickler.dispatch,  # pylint: disable=protected-access
              pickle.BYTEARRAY8[0]: load_bytearray8}


class _Lines(io.BytesIO):
  """The pickle's bytes; a text line cut off by the end of the file is an error."""

  def readline(self, size=-1):
    line = super().readline(size)
    if not line.endswith(b"\n"):
      raise pickle.UnpicklingError("pickle data was truncated")
    return line


def safe_unpickle(payload: bytes):
  """Unpickles `payload` (Python 2 or 3); arrays come back as unbuilt stand-ins."""
  return _AllowListUnpickler(_Lines(payload), encoding="latin1").load()


# -- .npz archives --------------------------------------------------------------------------
def _read_npz(payload, budget):
  """{name: array} for the `keys` / `embeddings` members of an .npz (others: None)."""
  contents = {}
  with zipfile.ZipFile(io.BytesIO(payload)) as archive:
    for info in archive.infolist():
      name = info.filename[:-len(".npy")] if info.filename.endswith(".npy") else info.filename
      contents[name] = _read_npy(archive, info, budget) if name in ("keys", "embeddings") else None
  return contents


def _read_npy(archive, info, budget):
  """One .npy member: its declared size counted, header checked, then read in chunks."""
  budget.spend(info.file_size, f"member {_short(info.filename)}")
  with archive.open(info) as stream:
    header_size, descr, fortran, shape = _npy_header(stream)
    dtype = _plain_dtype(descr, allow_object=False)
    nbytes = math.prod(shape) * dtype.itemsize
    if header_size + nbytes != info.file_size:
      raise _Refused(f"member {_short(info.filename)} describes a {dtype} array of shape {shape} "
                     f"({nbytes:,} bytes) but holds {info.file_size - header_size:,} bytes")
    data = bytearray(nbytes)
    for start in range(0, nbytes, _READ_CHUNK):
      chunk = stream.read(min(_READ_CHUNK, nbytes - start))
      if len(chunk) < min(_READ_CHUNK, nbytes - start):
        raise _Refused(f"member {_short(info.filename)} is truncated")
      data[start:start + len(chunk)] = chunk
    if stream.read(1):  # (also makes zipfile check the CRC)
      raise _Refused(f"member {_short(info.filename)} is longer than its header says")
  return np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")


def _npy_header(stream):
  """(header size, descr, fortran_order, shape) of a .npy stream, parsed without numpy."""
  magic = stream.read(8)
  if magic[:6] != b"\x93NUMPY" or magic[6:7] not in (b"\x01", b"\x02", b"\x03"):
    raise _Refused("a member is not a .npy array")
  length_format = "<H" if magic[6] == 1 else "<I"
  (length,) = struct.unpack(length_format, stream.read(struct.calcsize(length_format)))
  if length > _MAX_NPY_HEADER:
    raise _Refused(f"a .npy header has {length:,} bytes (at most {_MAX_NPY_HEADER:,})")
  header = ast.literal_eval(stream.read(length).decode("utf8" if magic[6] == 3 else "latin1"))
  if not (isinstance(header, dict) and set(header) == {"descr", "fortran_order", "shape"} and
          isinstance(header["fortran_order"], bool)):
    raise _Refused(f"a .npy header is {_short(header)}, not numpy's")
  return (8 + struct.calcsize(length_format) + length, header["descr"],
          header["fortran_order"], _shape(header["shape"]))


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
        f"{path}: keys[{index}] = {_short(key)} is malformed: expected exactly "
        "three '-'-separated fields '<prefix>-<class>-<file>'")
  _, class_name, image_file = fields
  if image_file.split("_")[0] != class_name:
    raise errors.DataError(
        f"{path}: keys[{index}] = {_short(key)} is malformed: the file name "
        f"{_short(image_file)} should start with its class {_short(class_name)} followed by '_'")
  return class_name, image_file


def _read_raw(path, cap):
  """(keys, embeddings, file bytes) of a .pkl or .npz file, built within a `_Budget`."""
  if not os.path.exists(path):
    raise errors.DataError(f"{path}: no such file")
  budget = _Budget(path, os.path.getsize(path), cap)
  with open(path, "rb") as handle:
    payload = handle.read()
  kind = ".npz archive" if path.endswith(".npz") else "pickle"
  try:
    contents = _read_npz(payload, budget) if kind == ".npz archive" else safe_unpickle(payload)
    if not isinstance(contents, dict):
      raise errors.DataError(
          f"{path}: expected a dict with 'keys' and 'embeddings', found a "
          f"{type(contents).__name__}")
    missing = [name for name in ("keys", "embeddings") if name not in contents]
    if missing:
      raise errors.DataError(
          f"{path}: the dict has no {' or '.join(repr(m) for m in missing)} entry "
          f"(found: {_short(list(contents))})")
    keys = _materialise(contents["keys"], budget)
    return keys, _materialise(contents["embeddings"], budget), payload
  except errors.UserError:
    raise
  except _Refused as exc:
    raise errors.DataError(
        f"{path}: {_short(exc, 600)}. Re-create the file from trusted data") from None
  except Exception as exc:  # pylint: disable=broad-except  # any malformed byte string
    raise errors.DataError(
        f"{path}: not a readable {kind} ({type(exc).__name__}: {_short(exc, 300)}); the "
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
          f"{path}: 'embeddings' row {index} is {_short(row)}, expected a row of D numbers")
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
  return _guarded(path, _load_split, max_bytes)


def read_keys_and_embeddings(path: str, max_bytes: Optional[int] = None):
  """(keys as str, float32 [n, D]) in file order, validated as `load_split` does."""
  def read(p, cap):
    keys, matrix, _, _, _ = _read_validated(p, cap)
    return keys, matrix
  return _guarded(path, read, max_bytes)


def _guarded(path, reader, max_bytes):
  try:
    return reader(path, max_array_bytes(max_bytes))
  except errors.UserError:
    raise
  except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError,
          RecursionError, MemoryError, UnicodeError) as exc:
    raise errors.DataError(
        f"{path}: malformed embeddings file ({type(exc).__name__}: {_short(exc, 300)}); "
        "expected a dict with 'keys' (n strings) and 'embeddings' (an n x D float "
        "array): re-create or re-download it") from None
  except OSError as exc:
    raise errors.DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _load_split(path: str, cap: int) -> EmbeddingSplit:
  _, matrix, class_rows, image_names, payload = _read_validated(path, cap)
  return _group_by_class(matrix, class_rows, image_names,
                         {path: hashlib.sha256(payload).hexdigest()})


def _read_validated(path, cap):
  raw_keys, raw_embeddings, payload = _read_raw(path, cap)
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
          f"{path}: duplicate image {_short(image_file)} at keys[{seen_files[image_file]}] "
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
        f"{_short(sorted(overlap)[:5])}; train/val/test classes must be disjoint")
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
                       how_to_get: Optional[str] = None,
                       max_bytes: Optional[int] = None) -> EmbeddingSplit:
  """Loads `<data_path>/<dataset_name>/<crop>/<split>_embeddings.{npz,pkl}`."""
  path = split_path(data_path, dataset_name, crop, split)
  if not os.path.exists(path):
    hint = how_to_get or "check --data_path, --dataset_name and --embedding_crop"
    raise errors.DataError(
        f"{path}: no such file (nor {path[:-len(PICKLE_SUFFIX)] + NPZ_SUFFIX}); "
        f"embeddings for dataset {dataset_name!r}, crop {crop!r}, split "
        f"{split!r} are expected there. {hint}")
  return load_split(path, max_bytes)


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
            f"{_short(sorted(shared)[:5])}; meta-train/val/test classes must be disjoint")


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


# -- keys that keep the image's relative path ------------------------------------------
# `path-<class>-<class>_<encoded relative path>`: letters, digits and '.' stand
# for themselves; every other character (including '_', '-', '/', spaces and
# non-ASCII) is written as '_hh' for each byte of its UTF-8 encoding (lowercase
# hex). The key is ASCII, holds no '-' after the class field, and
# `key_file_path` gives the path back exactly: 'cat/my file-1.png' ->
# 'path-cat-cat_cat_2fmy_20file_2d1.png'. Class `unlabelled` holds images that
# were in no class folder.
PATH_KEY_PREFIX = "path"
UNLABELLED = "unlabelled"
_PATH_LITERAL = re.compile(r"[A-Za-z0-9.]")
_PATH_ESCAPE = re.compile(r"_([0-9a-f]{2})")


def encode_path(path: str) -> str:
  """A relative path as `[A-Za-z0-9._]+` (see above); `decode_path` inverts it."""
  out = []
  for char in path:
    if _PATH_LITERAL.fullmatch(char):
      out.append(char)
    else:   # surrogateescape: undecodable file-name bytes survive too
      out.extend(f"_{b:02x}" for b in char.encode("utf-8", "surrogateescape"))
  return "".join(out)


def decode_path(text: str) -> str:
  """Inverse of `encode_path`; ValueError if `text` is not one of its outputs."""
  raw, pos = bytearray(), 0
  while pos < len(text):
    if text[pos] == "_":
      match = _PATH_ESCAPE.match(text, pos)
      if not match:
        raise ValueError(f"{_short(text)}: '_' at {pos} is not followed by two hex digits")
      raw.append(int(match.group(1), 16))
      pos = match.end()
    elif _PATH_LITERAL.fullmatch(text[pos]):
      raw.extend(text[pos].encode("ascii"))
      pos += 1
    else:
      raise ValueError(f"{_short(text)}: {text[pos]!r} at {pos} is never written by encode_path")
  return raw.decode("utf-8", "surrogateescape")


def make_path_key(class_token: str, relative_path: str) -> str:
  """`path-<class>-<class>_<encode_path(relative_path)>`, a valid `parse_key` key."""
  key = f"{PATH_KEY_PREFIX}-{class_token}-{class_token}_{encode_path(relative_path)}"
  parse_key(key, "make_path_key", 0)   # a class token with '-' or '_' is refused
  return key


def key_file_path(key: str) -> Optional[str]:
  """The relative path a `make_path_key` key keeps; None for other keys (no path)."""
  fields = key.split("-")
  if len(fields) != 3 or fields[0] != PATH_KEY_PREFIX:
    return None
  class_name, image_file = fields[1], fields[2]
  if not image_file.startswith(class_name + "_"):
    return None
  try:
    return decode_path(image_file[len(class_name) + 1:])
  except ValueError:
    return None
