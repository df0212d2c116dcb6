"""The allow-list unpickler of embeddings pickles (Python 2 or 3).

DeepMind's release stores each split as a pickle. It is read with an
allow-list unpickler whose few globals (numpy's array, dtype and scalar
reconstructors, latin1 bytes) are stand-ins: they record a dtype string, a
shape and raw bytes (or a list of elements) as `safe_arrays.DtypePlan` /
`safe_arrays.ArrayPlan`, which `safe_arrays.materialise` checks and builds.
No other name is resolved, so nothing from the file runs.
"""

import io
import pickle
import struct

import numpy as np

from leo_suite.data.safe_arrays import ArrayPlan
from leo_suite.data.safe_arrays import DtypePlan
from leo_suite.data.safe_arrays import Refused
from leo_suite.data.safe_arrays import shorten


def _scalar(dtype, data):
  """numpy's `scalar(dtype, raw)` for a plain dtype and exactly itemsize bytes."""
  dtype = dtype.resolve()
  raw = data.encode("latin1") if isinstance(data, str) else data
  if dtype == object or len(raw) != dtype.itemsize:
    raise Refused(f"the file asks for a {dtype} scalar from {len(raw):,} bytes; refused")
  return np.frombuffer(raw, dtype)[0]


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
      raise Refused(
          f"the file calls {self._name} with unexpected arguments "
          f"({shorten(', '.join(type(a).__name__ for a in args))}); refused")
    return self._function(*args)

  def __setattr__(self, name, value):
    raise Refused(f"the file tries to modify {self._name}; refused")

  def __setstate__(self, state):
    raise Refused(f"the file tries to modify {self._name}; refused")

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
      "_reconstruct": _Guarded("numpy multiarray._reconstruct", lambda *_: ArrayPlan(),
                               _reconstruct_args),
      "scalar": _Guarded("numpy multiarray.scalar", _scalar, lambda args: len(args) == 2 and (
          isinstance(args[0], DtypePlan) and _is_text(args[1]))),
      "_frombuffer": _Guarded("numpy numeric._frombuffer", ArrayPlan, lambda args: (
          4 <= len(args) <= 5 and isinstance(args[0], (bytes, bytearray)))),
      "ndarray": _NDARRAY_TOKEN,
      "dtype": _Guarded("numpy.dtype", DtypePlan, lambda args: (
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
    raise Refused(
        f"the file names the disallowed object {shorten(f'{module}.{name}')}; embeddings "
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
