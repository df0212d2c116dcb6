"""Arrays an untrusted embeddings file describes, built only once checked.

Nothing from a file reaches numpy but validated, plain descriptions: a dtype
string (a short list of plain dtypes, `plain_dtype`), a shape and raw bytes
(or a list of elements), whose sizes must agree (shape x itemsize equal to the
bytes present); only then is the array built with `np.frombuffer` or element
by element (`ArrayPlan.build`). The headers of `.npz` members are parsed here
too (`read_npz`). Every array, list and string is counted against a memory
budget before it is allocated (`Budget`, `max_array_bytes`), and values quoted
in messages are shortened (`shorten`). `leo_suite.data.safe_pickle` hands out
the stand-ins (`DtypePlan`, `ArrayPlan`) pickles build.
"""

import ast
import io
import math
import os
import re
import reprlib
import struct
import zipfile
from typing import Optional

import numpy as np

from leo_suite import errors

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


def shorten(value, limit=_TEXT_LIMIT):
  """`value` for a message (its repr, or an exception's text): one line, <= `limit` chars."""
  text = str(value) if isinstance(value, BaseException) else _REPR.repr(value)
  text = " ".join(text.split())
  return text if len(text) <= limit else text[:limit - 3] + "..."


class Refused(ValueError):
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
        f"{source}={shorten(value)}: expected a positive number of bytes (default "
        f"{MAX_ARRAY_BYTES})")
  return cap


class Budget:
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
  """The dtype for a descr string such as '<f4', '|S7', 'U7' or 'O8'; `Refused` otherwise.

  `byteorder` and `itemsize` (bytes) come from a pickled dtype's state and take
  precedence. Only bool, integer, float, bytes and str dtypes (and object, for
  arrays built element by element) exist here: no void, structured, subarray,
  datetime or flags.
  """
  match = _DESCR.fullmatch(descr) if isinstance(descr, str) else None
  if match is None or (match.group(2) == "O" and not allow_object):
    raise Refused(
        f"the file describes an array of dtype {shorten(descr)}; only plain bool, integer, "
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
  raise Refused(f"the file describes an array of dtype {descr!r} with {size} bytes per item")


class DtypePlan:
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
      raise Refused(
          f"the file gives dtype {self.descr!r} the state {shorten(state)}; only a byte order "
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
    raise Refused(f"the file gives an array the shape {shorten(value)}; expected a tuple of sizes")
  return value


class ArrayPlan:
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
      raise Refused(f"the file gives an array the state {shorten(state)}; refused")
    shape, dtype, fortran, data = state
    self._set(data, dtype, shape, "F" if fortran else "C", None)

  def _set(self, data, dtype, shape, order, axes):
    if self.dtype is not None:
      raise Refused("the file sets an array's contents twice; refused")
    shape = _shape(shape)
    if not (isinstance(dtype, DtypePlan) and isinstance(data, (bytes, bytearray, str, list))
            and (order in ("C", "F") and axes is None or order == "K" and
                 isinstance(axes, tuple) and sorted(axes) == list(range(len(shape))))):
      raise Refused(
          f"the file describes an array as {shorten((dtype, shape, order, axes))} with "
          f"{type(data).__name__} data; refused")
    self.data, self.dtype, self.shape, self.order, self.axes = data, dtype, shape, order, axes

  def build(self, budget, depth):
    """The array, once its size matches the data present and fits `budget`."""
    if self.dtype is None:
      raise Refused("the file leaves an array without contents")
    dtype, count = self.dtype.resolve(), math.prod(self.shape)
    if isinstance(self.data, list) != (dtype == object):
      raise Refused(f"the file gives {type(self.data).__name__} data for a {dtype} array "
                    "(object arrays list their elements, others give raw bytes); refused")
    if isinstance(self.data, list):
      if len(self.data) != count:
        raise Refused(f"the file gives {len(self.data):,} elements for an object array of "
                      f"shape {self.shape}")
      budget.spend(8 * count, "an object array")
      array = np.empty(count, dtype=object)
      for index, item in enumerate(self.data):
        array[index] = materialise(item, budget, depth + 1)
    else:
      raw = self.data.encode("latin1") if isinstance(self.data, str) else self.data
      if count * dtype.itemsize != len(raw):
        raise Refused(f"the file describes a {dtype} array of shape {self.shape} "
                      f"({count * dtype.itemsize:,} bytes) but gives {len(raw):,} bytes")
      budget.spend(len(raw), "an array")
      array = np.frombuffer(raw, dtype)  # read-only if `raw` is bytes: callers copy
    if self.axes is not None:
      return array.reshape(self.shape).transpose(self.axes)
    return array.reshape(self.shape, order=self.order)

  def __repr__(self):
    return "<array>"


def materialise(value, budget, depth=0):
  """`value` with its stand-ins built and its size counted against `budget`."""
  if isinstance(value, (str, bytes, bytearray)):
    budget.spend(len(value), "a string")
  if not isinstance(value, (list, tuple, ArrayPlan)):
    return value
  if depth > _MAX_DEPTH:
    raise Refused(f"'keys' or 'embeddings' is nested more than {_MAX_DEPTH} levels deep")
  if id(value) in budget.built:  # a memo reference: counted in full, built once
    if budget.built[id(value)] is None:
      raise Refused("'keys' or 'embeddings' contains itself")
    built, size = budget.built[id(value)]
    budget.spend(size, "a repeated reference")
    return built
  budget.built[id(value)] = None
  start = budget.spent
  if isinstance(value, ArrayPlan):
    built = value.build(budget, depth)
  else:
    budget.spend(8 * len(value), "a list")
    built = type(value)(materialise(item, budget, depth + 1) for item in value)
  budget.built[id(value)] = (built, budget.spent - start)
  return built


# -- .npz archives --------------------------------------------------------------------------
def read_npz(payload, budget):
  """{name: array} for the `keys` / `embeddings` members of an .npz (others: None)."""
  contents = {}
  with zipfile.ZipFile(io.BytesIO(payload)) as archive:
    for info in archive.infolist():
      name = info.filename[:-len(".npy")] if info.filename.endswith(".npy") else info.filename
      contents[name] = _read_npy(archive, info, budget) if name in ("keys", "embeddings") else None
  return contents


def _read_npy(archive, info, budget):
  """One .npy member: its declared size counted, header checked, then read in chunks."""
  budget.spend(info.file_size, f"member {shorten(info.filename)}")
  with archive.open(info) as stream:
    header_size, descr, fortran, shape = _npy_header(stream)
    dtype = _plain_dtype(descr, allow_object=False)
    nbytes = math.prod(shape) * dtype.itemsize
    if header_size + nbytes != info.file_size:
      raise Refused(f"member {shorten(info.filename)} describes a {dtype} array of shape {shape} "
                    f"({nbytes:,} bytes) but holds {info.file_size - header_size:,} bytes")
    data = bytearray(nbytes)
    for start in range(0, nbytes, _READ_CHUNK):
      chunk = stream.read(min(_READ_CHUNK, nbytes - start))
      if len(chunk) < min(_READ_CHUNK, nbytes - start):
        raise Refused(f"member {shorten(info.filename)} is truncated")
      data[start:start + len(chunk)] = chunk
    if stream.read(1):  # (also makes zipfile check the CRC)
      raise Refused(f"member {shorten(info.filename)} is longer than its header says")
  return np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")


def _npy_header(stream):
  """(header size, descr, fortran_order, shape) of a .npy stream, parsed without numpy."""
  magic = stream.read(8)
  if magic[:6] != b"\x93NUMPY" or magic[6:7] not in (b"\x01", b"\x02", b"\x03"):
    raise Refused("a member is not a .npy array")
  length_format = "<H" if magic[6] == 1 else "<I"
  (length,) = struct.unpack(length_format, stream.read(struct.calcsize(length_format)))
  if length > _MAX_NPY_HEADER:
    raise Refused(f"a .npy header has {length:,} bytes (at most {_MAX_NPY_HEADER:,})")
  header = ast.literal_eval(stream.read(length).decode("utf8" if magic[6] == 3 else "latin1"))
  if not (isinstance(header, dict) and set(header) == {"descr", "fortran_order", "shape"} and
          isinstance(header["fortran_order"], bool)):
    raise Refused(f"a .npy header is {shorten(header)}, not numpy's")
  return (8 + struct.calcsize(length_format) + length, header["descr"],
          header["fortran_order"], _shape(header["shape"]))
