"""Hostile embeddings files built byte by byte: crashes, memory bombs, huge messages.

Each probe is an attack reported on the loader (issue 11): pickles that turn
file bytes into object pointers (SIGSEGV before the fix), allocations chosen
by the file (a 600 MB void scalar, a memoised row repeated 12,000 times, a
1 MB zip bomb, a 10-byte memo index), and a 100 kB key quoted 1,000 times.
Crash and memory probes run in a subprocess with a capped address space (a
regression fails the test, not the machine), which reports its peak RSS. A
hypothesis generator then builds >= 2,000 pickles from the opcodes the
unpickler accepts: each loads or is a one-line `DataError`.
"""

import contextlib
import io
import itertools
import os
import pickle
import resource
import struct
import subprocess
import sys
import zlib

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
import numpy as np
import pytest

from leo_suite import errors
from leo_suite.data import embedding_keys
from leo_suite.data import embeddings
from leo_suite.data import safe_arrays
from leo_suite.data import safe_pickle
from tests.test_safety import call, global_op, py2_float32_array, py2_int, py2_release_pickle
from tests.test_safety import py2_str, text
from tests import scripts_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2**20
KEYS = [b"img-n01-n01_1.JPEG", b"img-n01-n01_2.JPEG"]


# -- hand-built hostile pickles ---------------------------------------------------------
def dtype_ops(descr: bytes, byteorder=b"|", names=b"N", fields=b"N", elsize=-1, alignment=-1,
              flags=0) -> bytes:
  """numpy.dtype(descr, False, True) + BUILD of a state the file chooses."""
  return (call("numpy", "dtype", py2_str(descr), b"\x89\x88") + b"(" + py2_int(3) +
          py2_str(byteorder) + b"N" + names + fields + py2_int(elsize) + py2_int(alignment) +
          py2_int(flags) + b"tb")


def shape_op(shape) -> bytes:
  return b"(" + b"".join(py2_int(n) for n in shape) + b"t"


def reconstructed(shape: bytes, dtype: bytes, data: bytes) -> bytes:
  """_reconstruct(ndarray, (0,), 'b') + BUILD (1, shape, dtype, False, data)."""
  return (call("numpy.core.multiarray", "_reconstruct", global_op("numpy", "ndarray"),
               py2_int(0) + b"\x85", py2_str(b"b")) +
          b"(" + py2_int(1) + shape + dtype + b"\x89" + data + b"tb")


def key_list(keys=KEYS) -> bytes:
  return b"](" + b"".join(py2_str(k) for k in keys) + b"e"


def split_pickle(keys_ops: bytes, embeddings_ops: bytes = b"") -> bytes:
  """{'keys': ..., 'embeddings': ...} (2 x 3 float32 ones unless given)."""
  embeddings_ops = embeddings_ops or py2_float32_array(np.ones((2, 3), np.float32))
  return b"\x80\x02}(" + text("keys") + keys_ops + text("embeddings") + embeddings_ops + b"u."


POINTERS = b"A" * 16  # read as two object pointers: 0x4141414141414141


def flags_zero_pickle() -> bytes:
  """An object array whose dtype state sets flags to 0: numpy copies raw bytes as pointers."""
  return split_pickle(reconstructed(shape_op((2,)), dtype_ops(b"O8", flags=0), py2_str(POINTERS)))


def object_field_pickle() -> bytes:
  """A structured dtype with an object field, filled from raw bytes by _frombuffer."""
  field = dtype_ops(b"O8", flags=63)
  record = dtype_ops(b"V8", names=b"(" + py2_str(b"a") + b"t",
                     fields=b"}(" + py2_str(b"a") + field + py2_int(0) + b"\x86u",
                     elsize=8, alignment=1, flags=0)
  return split_pickle(call("numpy.core.numeric", "_frombuffer", b"C\x10" + POINTERS, record,
                           py2_int(2) + b"\x85", py2_str(b"C")))


def void_scalar_pickle() -> bytes:
  """numpy scalar(dtype('V600000000')): 600 MB of zeros from 262 bytes."""
  return split_pickle(key_list(), call("numpy.core.multiarray", "scalar",
                                       dtype_ops(b"V600000000", elsize=600000000, alignment=1)))


def memo_row_pickle(width=13000, repeats=12000) -> bytes:
  """One row of `width` floats, memoised, then referenced `repeats` times (BINGET)."""
  row = b"](" + (b"G" + struct.pack(">d", 0.5)) * width + b"eq\x01"
  return split_pickle(key_list(), b"](" + row + b"h\x01" * (repeats - 1) + b"e")


def long_key_pickle(length=100_000, repeats=1000) -> bytes:
  """A dict without 'keys' whose 1,000 keys are (one memoised 100 kB string, i)."""
  pairs = text("k" * length) + b"q\x01" + py2_int(0) + b"\x86N"
  pairs += b"".join(b"h\x01" + py2_int(i) + b"\x86N" for i in range(1, repeats))
  return b"\x80\x02}(" + pairs + b"u."


def memo_index_pickle(index=2**30) -> bytes:
  """LONG_BINPUT at `index`: the C unpickler allocates 16 bytes per index up to it."""
  return b"\x80\x02N" + b"r" + struct.pack("<I", index) + b"."


# -- a zip bomb, written by hand ------------------------------------------------------------
def zip_archive(members) -> bytes:
  """A zip of (name, method, crc, stored bytes, declared size) members."""
  local, central = b"", b""
  for name, method, crc, data, size in members:
    name = name.encode()
    central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0, crc,
                           len(data), size, len(name), 0, 0, 0, 0, 0, len(local)) + name
    local += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0, crc, len(data), size,
                         len(name), 0) + name + data
  return local + central + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members),
                                       len(members), len(central), len(local), 0)


def npy_header(shape, descr="<f4") -> bytes:
  buffer = io.BytesIO()
  np.lib.format.write_array_header_1_0(
      buffer, {"descr": descr, "fortran_order": False, "shape": shape})
  return buffer.getvalue()


def npz_bomb(zero_chunks=64, shape=(2**18, 2**10), declared=None) -> bytes:
  """keys (2 strings) + embeddings.npy: a header then `zero_chunks` x 16 MiB of zeros, deflated.

  Each 16 MiB of zeros is compressed once and repeated (full flushes make the
  pieces independent), so 1 GiB costs ~1 MB on disk and no time to build.
  `declared`: the member's size in the zip directory, if not the true one.
  """
  chunk = bytes(16 * MIB)
  header = npy_header(shape)
  pieces = [zlib.compressobj(9, zlib.DEFLATED, -15) for _ in range(2)]
  head = pieces[0].compress(header) + pieces[0].flush(zlib.Z_FULL_FLUSH)
  zeros = pieces[1].compress(chunk) + pieces[1].flush(zlib.Z_FULL_FLUSH)
  stream = head + zeros * zero_chunks + zlib.compressobj(9, zlib.DEFLATED, -15).flush()
  size = len(header) + zero_chunks * len(chunk)
  declared = declared or size  # a smaller size: the CRC is of what it declares
  crc = zlib.crc32(header)
  for start in range(len(header), declared, len(chunk)):
    crc = zlib.crc32(memoryview(chunk)[:declared - start], crc)
  keys = npy_header((2,), "<U18") + "".join(k.decode() for k in KEYS).encode("utf-32-le")
  return zip_archive([("keys.npy", 0, zlib.crc32(keys), keys, len(keys)),
                      ("embeddings.npy", 8, crc, stream, declared)])


# -- running the loader as the CLI does, in a subprocess ---------------------------------------
# Peak RSS is VmHWM: ru_maxrss would include the parent's RSS when the child was forked.
LOADER = """
import resource, sys
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
import numpy
from leo_suite import errors
from leo_suite.data import embeddings
def peak_kib():
  with open("/proc/self/status") as status:
    return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
base = peak_kib()
code = 0
try:
  embeddings.{function}(sys.argv[1])
except errors.UserError as exc:  # as runner.py and the scripts report it
  print(f"error: {{exc}}", file=sys.stderr)
  code = 2
print((peak_kib() - base) // 1024)
sys.exit(code)
"""


def run_loader(path, function="load_split", address_space=3 * 2**30, env=None):
  """(exit code, stderr, peak RSS in MiB above importing numpy and the loader)."""
  proc = subprocess.run(
      [sys.executable, "-c", LOADER.format(function=function), str(path), str(address_space)],
      capture_output=True, text=True, cwd=REPO, timeout=300, check=False,
      env=dict(os.environ, OPENBLAS_NUM_THREADS="1", **(env or {})))
  peak = int(proc.stdout.split()[-1]) if proc.stdout.strip() else None
  return proc.returncode, proc.stderr, peak


def assert_one_error_line(code, stderr, path, fragment=""):
  assert code == 2, (code, stderr[-2000:])   # never 139 (SIGSEGV) / -9 (OOM killer)
  lines = stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), stderr[-2000:]
  assert len(lines[0]) < len(str(path)) + 1000, len(lines[0])
  assert fragment in lines[0], lines[0]
  assert "MemoryError" not in lines[0]
  return lines[0]


def write(tmp_path, payload, name="train_embeddings.pkl"):
  path = tmp_path / name
  path.write_bytes(payload)
  return path


# -- 1. raw bytes as object pointers: a clean error, not SIGSEGV ---------------------------
POINTER_PROBES = {"flags_zero": (flags_zero_pickle, "object arrays list their elements"),
                  "object_field": (object_field_pickle, "dtype 'V8'")}


@pytest.mark.parametrize("probe", sorted(POINTER_PROBES))
@pytest.mark.parametrize("function", ["load_split", "read_keys_and_embeddings"])
def test_pointer_pickles_are_refused_not_a_segfault(tmp_path, probe, function):
  build, fragment = POINTER_PROBES[probe]
  path = write(tmp_path, build())
  code, stderr, _ = run_loader(path, function)
  assert_one_error_line(code, stderr, path, fragment)
  with pytest.raises(errors.DataError, match=fragment):
    getattr(embeddings, function)(str(path))


def test_runner_and_converter_report_pointer_pickles_in_one_line(tmp_path):
  folder = tmp_path / "evil" / "center"
  folder.mkdir(parents=True)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", OPENBLAS_NUM_THREADS="1")
  commands = {
      "flags_zero": ["runner.py", f"--data_path={tmp_path}", "--dataset_name=evil",
                     "--num_steps_limit=1", f"--checkpoint_path={tmp_path / 'run'}"],
      "object_field": ["scripts/convert_embeddings.py",
                       f"--input={folder / 'train_embeddings.pkl'}"]}
  for probe, command in commands.items():
    path = write(folder, POINTER_PROBES[probe][0]())
    proc = scripts_run.run([sys.executable, *command], capture_output=True, text=True, env=env,
                           cwd=REPO, timeout=300, check=False)
    errors_printed = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, (probe, proc.returncode, proc.stderr[-2000:])
    assert len(errors_printed) == 1 and errors_printed[0].startswith(f"error: {path}: "), (
        probe, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and POINTER_PROBES[probe][1] in errors_printed[0]


# -- 2. allocations chosen by the file: refused before allocating, peak RSS bounded ----------
ALLOCATION_PROBES = {
    "void_scalar": (void_scalar_pickle, "train_embeddings.pkl", "dtype 'V600000000'"),
    "memo_row": (memo_row_pickle, "train_embeddings.pkl", "256 times the file's"),
    "memo_index": (memo_index_pickle, "train_embeddings.pkl", "found a NoneType"),
    "npz_bomb": (npz_bomb, "train_embeddings.npz", "256 times the file's"),
    "npz_header_lies": (lambda: npz_bomb(declared=len(npy_header((2**18, 2**10))) + 1024),
                        "train_embeddings.npz", "but holds 1,024 bytes"),
    "npz_stream_longer": (lambda: npz_bomb(shape=(256, 1),
                                           declared=len(npy_header((256, 1))) + 1024),
                          "train_embeddings.npz", "2 keys but 256 embedding rows"),
}


@pytest.mark.parametrize("probe", sorted(ALLOCATION_PROBES))
def test_allocation_probes_are_refused_with_bounded_memory(tmp_path, probe):
  build, name, fragment = ALLOCATION_PROBES[probe]
  payload = build()
  assert len(payload) < 1.1 * MIB
  path = write(tmp_path, payload, name)
  code, stderr, peak_mib = run_loader(path)
  assert_one_error_line(code, stderr, path, fragment)
  assert peak_mib < 100, f"{probe}: peak {peak_mib} MiB above importing numpy"


def test_cap_comes_from_the_argument_or_the_environment(tmp_path, monkeypatch):
  keys = [embedding_keys.make_key(f"c{c}", i) for c in range(4) for i in range(250)]
  rows = np.random.default_rng(0).standard_normal((1000, 1000)).astype(np.float32)  # 4 MB
  path = str(tmp_path / "train_embeddings.npz")
  embeddings.write_split(path, keys, rows)
  monkeypatch.setenv(safe_arrays.MAX_ARRAY_BYTES_ENV, str(MIB))
  for function in (embeddings.load_split, embeddings.read_keys_and_embeddings):
    with pytest.raises(errors.DataError, match=f"cap of 1,048,576 bytes.*"
                       f"{safe_arrays.MAX_ARRAY_BYTES_ENV}"):
      function(path)
  np.testing.assert_array_equal(
      embeddings.read_keys_and_embeddings(path, max_bytes=8 * MIB)[1], rows)
  assert embeddings.load_split(path, max_bytes=8 * MIB).num_classes == 4
  with pytest.raises(errors.DataError, match="cap of 1,000 bytes"):
    embeddings.load_split(path, max_bytes=1000)  # the file itself is larger
  monkeypatch.setenv(safe_arrays.MAX_ARRAY_BYTES_ENV, "4G")
  with pytest.raises(errors.ConfigError, match="LEO_SUITE_MAX_ARRAY_BYTES='4G'"):
    embeddings.load_split(path)
  monkeypatch.delenv(safe_arrays.MAX_ARRAY_BYTES_ENV)
  assert safe_arrays.max_array_bytes() == safe_arrays.MAX_ARRAY_BYTES == 4 * 2**30
  assert embeddings.load_split(path).num_classes == 4
  code, stderr, _ = run_loader(path, env={safe_arrays.MAX_ARRAY_BYTES_ENV: "100000"})
  assert_one_error_line(code, stderr, path, "cap of 100,000 bytes")


# -- 3. values quoted in messages are shortened -------------------------------------------
LONG = "k" * 100_000
LONG_VALUE_PROBES = {
    "dict_keys": long_key_pickle(),
    "malformed_key": split_pickle(key_list([LONG.encode(), KEYS[1]])),
    "class_mismatch": split_pickle(key_list([b"x-a-" + LONG.encode(), KEYS[1]])),
    "duplicate": split_pickle(key_list([b"x-a-a_" + LONG.encode()] * 2)),
    "global_name": split_pickle(key_list(), global_op("os", "system" + LONG)),
    "dtype_descr": split_pickle(key_list(), call("numpy", "dtype", text(LONG))),
    "huge_int": b"\x80\x02}(" + b"\x8a\xff" + b"\x7f" * 255 + b"Nu.",
    "row": split_pickle(key_list(), b"](" + text(LONG) + b"e"),
}


@pytest.mark.parametrize("probe", sorted(LONG_VALUE_PROBES))
def test_long_values_are_shortened_in_error_lines(tmp_path, probe):
  path = write(tmp_path, LONG_VALUE_PROBES[probe])
  with pytest.raises(errors.DataError) as info:
    embeddings.load_split(str(path))
  message = str(info.value)
  assert message.startswith(f"{path}: ") and len(message) < len(str(path)) + 1000, len(message)
  assert "\n" not in message
  assert ("-bit int>" if probe == "huge_int" else "kkkkk") in message, message
  if probe == "dict_keys":  # printed 100 MB before the fix; the CLI prints one short line
    assert_one_error_line(*run_loader(path)[:2], path, "found: [('kkk")


# -- what must keep loading, bit-exact ------------------------------------------------------
ARRAYS = {
    "k_order_3d": np.arange(24, dtype=">f8").reshape(2, 3, 4).transpose(1, 0, 2),
    "fortran": np.asfortranarray(np.arange(6, dtype=np.float16).reshape(2, 3)),
    "strided": np.arange(24, dtype=np.int16).reshape(4, 6)[::2, ::3],
    "bool": np.array([True, False]), "uint8": np.arange(5, dtype=np.uint8),
    "str": np.asarray(["a", "b\u00e9c"]), "bytes": np.asarray([b"a", b"bc"]),
    "objects": np.asarray(["a", b"b", ["c"], np.float32(1.5)], dtype=object),
    "scalars": [np.float32(0.25), np.int64(-3), np.str_("x")],
}


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_numpy_arrays_of_every_plain_dtype_and_layout_are_rebuilt_exactly(protocol):
  # pylint: disable=protected-access
  payload = pickle.dumps(ARRAYS, protocol)
  budget = safe_arrays.Budget("memory", len(payload), safe_arrays.MAX_ARRAY_BYTES)
  stand_ins = safe_pickle.safe_unpickle(payload)
  for name, expected in ARRAYS.items():
    rebuilt = safe_arrays.materialise(stand_ins[name], budget)
    if isinstance(expected, np.ndarray):
      assert rebuilt.dtype == expected.dtype and rebuilt.shape == expected.shape, name
    assert repr(rebuilt) == repr(expected), name
    assert [type(x) for x in np.ravel(rebuilt)] == [type(x) for x in np.ravel(expected)], name


def test_splits_in_every_layout_still_load_bit_exact(tmp_path):
  keys = [embedding_keys.make_key(f"c{c}", i) for c in range(2) for i in range(3)]
  rows = np.random.default_rng(1).standard_normal((6, 2))
  layouts = {"fortran": np.asfortranarray(rows, ">f8"), "big_endian": rows.astype(">f4"),
             "strided": np.repeat(rows, 2, axis=1)[:, ::2], "int16": (rows * 100).astype(np.int16),
             "list_of_numpy_scalars": [[np.float32(v) for v in row] for row in rows]}
  stored_keys = {"str_array": np.asarray(keys), "bytes_array": np.asarray(keys, dtype="S"),
                 "bytes_objects": np.asarray([k.encode() for k in keys], dtype=object),
                 "tuple": tuple(keys)}
  for (name, matrix), (key_kind, key_values) in zip(layouts.items(),
                                                    itertools.cycle(stored_keys.items())):
    for protocol in (0, 2, 4, 5):
      path = write(tmp_path, pickle.dumps({"keys": key_values, "embeddings": matrix}, protocol))
      keys_read, loaded = embeddings.read_keys_and_embeddings(str(path))
      assert keys_read == keys, (name, key_kind, protocol)
      assert loaded.tobytes() == np.asarray(matrix, np.float32).tobytes(), (name, protocol)


# -- generated pickles: every one loads or is a one-line DataError ----------------------------
def int_op(n: int) -> bytes:
  if 0 <= n < 256:
    return b"K" + bytes([n])
  if -2**31 <= n < 2**31:
    return py2_int(n)
  raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
  return b"\x8a" + bytes([len(raw)]) + raw  # LONG1


def text_op(value: str, kind: int) -> bytes:
  raw = value.encode("utf8", "surrogatepass")
  return [text(value), b"\x8c" + bytes([len(raw)]) + raw if len(raw) < 256 else text(value),
          py2_str(raw)][kind]


def bytes_op(value: bytes, kind: int) -> bytes:
  return [b"C" + bytes([len(value)]) + value, b"B" + struct.pack("<I", len(value)) + value,
          b"\x96" + struct.pack("<Q", len(value)) + value, py2_str(value)][kind]


GOOD_KEYS = [embedding_keys.make_key(c, i) for c in ("a", "b") for i in range(3)]
ALLOWED = [("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
           ("numpy.core.numeric", "_frombuffer"), ("numpy", "ndarray"), ("numpy", "dtype"),
           ("_codecs", "encode"), ("__builtin__", "bytes"), ("builtins", "bytearray")]
DISALLOWED = [("os", "system"), ("builtins", "eval"), ("builtins", "getattr"),
              ("numpy", "frombuffer"), ("numpy.core.multiarray", "empty"), ("numpy", "load"),
              ("copy_reg", "_reconstructor"), ("numpy.lib.format", "read_array")]
DESCRS = [b"f4", b"<f8", b">f4", b"f2", b"i8", b">i2", b"u1", b"b1", b"O8", b"|O", b"U7",
          b"<U4", b"S3", b"S0", b"V8", b"V600000000", b"c8", b"M8[s]", b"f3", b"O4"]
SINGLE_OPS = list(b"().NJKMGhq0125acdeglpstuR]}b\x85\x86\x87\x88\x89\x81\x92\x93\x94\x95")

leaves = st.one_of(
    st.integers(-2**70, 2**70).map(int_op),
    st.floats().map(lambda f: b"G" + struct.pack(">d", f)),
    st.tuples(st.one_of(st.text(max_size=12), st.sampled_from(GOOD_KEYS)),
              st.integers(0, 2)).map(lambda t: text_op(*t)),
    st.tuples(st.binary(max_size=40), st.integers(0, 3)).map(lambda t: bytes_op(*t)),
    st.sampled_from([b"N", b"\x88", b"\x89", b")", b"]", b"}"]),
    st.integers(0, 3).map(lambda i: b"h" + bytes([i])),  # BINGET (maybe of nothing)
    st.sampled_from(ALLOWED + DISALLOWED).map(lambda g: global_op(*g)),
    st.sampled_from(ALLOWED).map(lambda g: text(g[0]) + text(g[1]) + b"\x93"),  # STACK_GLOBAL
)
dtypes = st.builds(
    lambda descr, build, order, names, flags, elsize: (
        dtype_ops(descr, order, *names, elsize=elsize, flags=flags) if build else
        call("numpy", "dtype", py2_str(descr), b"\x89\x88")),
    st.sampled_from(DESCRS), st.booleans(), st.sampled_from([b"|", b"<", b">", b"=", b"x"]),
    st.sampled_from([(b"N", b"N"), (b"(" + py2_str(b"a") + b"t",
                                    b"}(" + py2_str(b"a") + b"(" + call(
                                        "numpy", "dtype", py2_str(b"O8")) + b"K\x00tu")]),
    st.sampled_from([0, 63, 27, -1]), st.sampled_from([-1, 0, 3, 8, 28, 600000000]))
shapes = st.lists(st.integers(0, 5), max_size=3).map(shape_op)


def composite(children):
  """Values built from `children`: containers, calls, BUILD, memo, arrays, NEWOBJ, INST."""
  many = st.lists(children, max_size=5)
  return st.one_of(
      many.map(lambda xs: b"](" + b"".join(xs) + b"e"),
      many.map(lambda xs: b"(" + b"".join(xs) + b"l"),
      many.map(lambda xs: b"(" + b"".join(xs) + b"t"),
      st.lists(children, min_size=1, max_size=3).map(
          lambda xs: b"".join(xs) + bytes([0x84 + len(xs)])),  # TUPLE1-3
      st.lists(st.tuples(children, children), max_size=3).map(
          lambda kv: b"}(" + b"".join(k + v for k, v in kv) + b"u"),
      st.tuples(st.sampled_from(ALLOWED + DISALLOWED), many).map(
          lambda g: call(*g[0], *g[1])),
      st.tuples(children, children).map(lambda t: t[0] + t[1] + b"b"),  # BUILD
      st.tuples(children, children).map(lambda t: t[0] + t[1] + b"\x81"),  # NEWOBJ
      st.tuples(st.sampled_from(ALLOWED + DISALLOWED), many).map(
          lambda g: b"(" + b"".join(g[1]) + b"i" + "\n".join(g[0]).encode() + b"\n"),  # INST
      st.tuples(children, st.sampled_from([0, 1, 3, 2**31, 2**32 - 1])).map(
          lambda t: t[0] + (b"q" + bytes([t[1]]) if t[1] < 256 else
                            b"r" + struct.pack("<I", t[1]))),  # BINPUT / LONG_BINPUT
      children.map(lambda x: x + b"\x94"),  # MEMOIZE
      st.builds(reconstructed, shapes, dtypes, st.one_of(
          st.binary(max_size=48).map(lambda b: bytes_op(b, 0)),
          many.map(lambda xs: b"](" + b"".join(xs) + b"e"))),
      st.tuples(st.binary(max_size=48), dtypes, shapes, st.sampled_from([b"C", b"F", b"K"])).map(
          lambda t: call("numpy.core.numeric", "_frombuffer", bytes_op(t[0], 0), t[1], t[2],
                         py2_str(t[3]))),
      st.tuples(dtypes, st.binary(max_size=16)).map(
          lambda t: call("numpy.core.multiarray", "scalar", t[0], bytes_op(t[1], 0))),
  )


values = st.recursive(leaves | dtypes, composite, max_leaves=16)


@st.composite
def splits(draw):
  """{'keys': n good keys or a value, 'embeddings': (n, D) data in some encoding or a value}."""
  n, dim = draw(st.integers(0, 6)), draw(st.integers(0, 4))
  keys = GOOD_KEYS[:n]
  matrix = draw(st.sampled_from([np.float32, np.float64, np.int8, ">f8"]))
  matrix = np.arange(n * dim).reshape(n, dim).astype(matrix)
  keys_ops = draw(st.one_of(st.just(key_list([k.encode() for k in keys])), values))
  rows = draw(st.one_of(
      st.just(py2_float32_array(matrix)),
      st.just(b"](" + b"".join(b"](" + b"".join(b"G" + struct.pack(">d", v) for v in row) +
                                b"e" for row in matrix) + b"e"),
      st.just(call("numpy.core.numeric", "_frombuffer", bytes_op(matrix.tobytes(), 1),
                   call("numpy", "dtype", py2_str(matrix.dtype.str.encode())),
                   shape_op((n, dim)), py2_str(b"C"))),
      values))
  return split_pickle(keys_ops, rows)


VALID_FILES = [py2_release_pickle([k.encode() for k in GOOD_KEYS], np.ones((6, 3), np.float32))] + [
    pickle.dumps({"keys": np.asarray(GOOD_KEYS, dtype=object),
                  "embeddings": np.arange(12, dtype=np.float32).reshape(6, 2)}, protocol)
    for protocol in range(6)]


@st.composite
def mutated(draw):
  """A valid file with a few bytes flipped, inserted (opcodes) or deleted."""
  payload = bytearray(draw(st.sampled_from(VALID_FILES)))
  for _ in range(draw(st.integers(1, 4))):
    position = draw(st.integers(0, len(payload) - 1))
    action = draw(st.sampled_from(["flip", "insert", "delete"]))
    if action == "flip":
      payload[position] = draw(st.integers(0, 255))
    elif action == "insert":
      payload[position:position] = draw(st.one_of(st.sampled_from(SINGLE_OPS).map(
          lambda op: bytes([op])), values))
    else:
      del payload[position:position + draw(st.integers(1, 8))]
  return bytes(payload)


PICKLES = st.one_of(
    splits(),
    values.map(lambda v: b"\x80\x02" + v + b"."),
    st.lists(st.one_of(values, st.sampled_from(SINGLE_OPS).map(lambda op: bytes([op]))),
             max_size=12).map(lambda ops: b"".join(ops) + b"."),  # opcode soup
    mutated())


@contextlib.contextmanager
def address_space_limit(extra=2 * 2**30):
  """Caps this process's address space at its size + `extra`: a bomb raises MemoryError."""
  soft, hard = resource.getrlimit(resource.RLIMIT_AS)
  with open("/proc/self/statm") as statm:
    size = int(statm.read().split()[0]) * resource.getpagesize()
  resource.setrlimit(resource.RLIMIT_AS, (size + extra, hard))
  try:
    yield
  finally:
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def load_or_refuse(path):
  """The split, or the DataError: one line naming the file, short, not a MemoryError."""
  try:
    split = embeddings.load_split(str(path))
  except errors.DataError as exc:
    message = str(exc)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    assert len(message) < len(str(path)) + 1000 and "MemoryError" not in message, message
    return exc
  assert split.embeddings.dtype == np.float32 and split.embeddings.ndim == 2
  assert np.isfinite(split.embeddings).all()
  assert split.class_count.sum() == split.embeddings.shape[0] == len(split.image_names)
  return split


@settings(max_examples=2000, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(payload=PICKLES)
def test_generated_pickles_load_or_are_refused_in_one_line(tmp_path, payload):
  path = write(tmp_path, payload)
  with address_space_limit():
    result = load_or_refuse(path)
  outcome = str(result)[len(str(path)) + 2:].split(" ")[:3]
  event("loaded" if isinstance(result, embeddings.EmbeddingSplit) else " ".join(outcome))
