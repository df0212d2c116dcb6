"""Safe loading of untrusted files, the .npz converter, and paths that stay put.

Pickles are built by hand where it matters (a Python 2 release-style file;
GLOBAL/REDUCE chains no __reduce__ would produce) so the tests see exactly the
bytes an attacker or the 2018 release would hand the loader.
"""

import io
import os
import pickle
import struct
import sys

import numpy as np
import pytest

from leo_suite import errors
from leo_suite import fileio
from leo_suite.data import convert as convert_embeddings
from leo_suite.data import embedding_keys
from leo_suite.data import embeddings

from tests import scripts_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- hand-built Python 2 pickles (protocol 2, py2 `str` = SHORT_BINSTRING/BINSTRING) --
def py2_str(raw: bytes) -> bytes:
  if len(raw) < 256:
    return b"U" + bytes([len(raw)]) + raw
  return b"T" + struct.pack("<i", len(raw)) + raw


def py2_int(value: int) -> bytes:
  return b"J" + struct.pack("<i", value)


def global_op(module: str, name: str) -> bytes:
  return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def py2_float32_array(matrix: np.ndarray) -> bytes:
  """numpy 1.x under Python 2: _reconstruct(ndarray, (0,), 'b') + BUILD state."""
  matrix = np.ascontiguousarray(matrix, "<f4")
  dtype = (global_op("numpy", "dtype") + py2_str(b"f4") + py2_int(0) + py2_int(1) +
           b"\x87R" + b"(" + py2_int(3) + py2_str(b"<") + b"NNN" + py2_int(-1) +
           py2_int(-1) + py2_int(0) + b"tb")
  shape = b"(" + b"".join(py2_int(n) for n in matrix.shape) + b"t"
  return (global_op("numpy.core.multiarray", "_reconstruct") + global_op("numpy", "ndarray") +
          py2_int(0) + b"\x85" + py2_str(b"b") + b"\x87R" +
          b"(" + py2_int(1) + shape + dtype + b"\x89" + py2_str(matrix.tobytes()) + b"tb")


def py2_release_pickle(keys, matrix) -> bytes:
  """{'keys': [py2 str, ...], 'embeddings': float32 array} as LEO's release wrote it."""
  key_list = b"](" + b"".join(py2_str(k) for k in keys) + b"e"
  return (b"\x80\x02}(" + py2_str(b"keys") + key_list + py2_str(b"embeddings") +
          py2_float32_array(matrix) + b"u.")


def test_hand_built_python2_release_pickle_loads(tmp_path):
  # Latin-1 bytes in a py2 str (0xe9 = 'e acute') must come back as that character.
  keys = [b"img-n01-n01_caf\xe9.JPEG", b"img-n01-n01_2.JPEG", b"img-n02-n02_1.JPEG"]
  matrix = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
  payload = py2_release_pickle(keys, matrix)
  assert b"numpy.core.multiarray" in payload and b"\x80\x02" == payload[:2]
  path = tmp_path / "train_embeddings.pkl"
  path.write_bytes(payload)
  split = embeddings.load_split(str(path))
  assert split.class_names == ["n01", "n02"]
  assert split.image_names[0] == "n01_caf\u00e9.JPEG"
  np.testing.assert_array_equal(split.embeddings, matrix)  # bit-exact, no conversion
  keys_read, rows = embeddings.read_keys_and_embeddings(str(path))
  assert keys_read == [k.decode("latin1") for k in keys]
  np.testing.assert_array_equal(rows, matrix)


# -- hostile pickles --------------------------------------------------------------
def call(module, name, *args_ops) -> bytes:
  """GLOBAL module.name applied to the pickled args (MARK ... TUPLE REDUCE)."""
  return global_op(module, name) + b"(" + b"".join(args_ops) + b"tR"


def text(value: str) -> bytes:
  raw = value.encode()
  return b"X" + struct.pack("<I", len(raw)) + raw


def wrap(value_ops: bytes, where: str) -> bytes:
  """Places the payload as `embeddings`, deep in lists/dicts, or in an object array."""
  key = text("keys") + b"](" + text("x-a-a_1") + b"e"
  if where == "top":
    body = value_ops
  elif where == "nested":
    body = b"](}(" + text("inner") + b"](" + value_ops + b"eue"
  elif where == "key":  # the keys list itself
    key = text("keys") + b"](" + value_ops + b"e"
    body = b"](" + py2_int(1) + b"e"
  else:  # an element of an object array (the release's keys are one)
    body = (call("numpy.core.multiarray", "_reconstruct", global_op("numpy", "ndarray"),
                 py2_int(0) + b"\x85", py2_str(b"b")) +
            b"(" + py2_int(1) + b"(" + py2_int(1) + b"t" +
            call("numpy", "dtype", py2_str(b"O8"), b"\x89\x88") +
            b"(" + py2_int(3) + py2_str(b"|") + b"NNN" + py2_int(-1) + py2_int(-1) +
            py2_int(63) + b"tb" + b"\x89](" + value_ops + b"etb")
  return b"\x80\x02}(" + key + text("embeddings") + body + b"u."


def attacks(marker):
  cmd = f"touch {marker}"
  return {
      "os.system": call("os", "system", text(cmd)),
      "posix.system": call("posix", "system", text(cmd)),
      "eval": call("builtins", "eval", text(f"open({str(marker)!r}, 'w')")),
      "exec": call("__builtin__", "exec", text(f"open({str(marker)!r}, 'w')")),
      "subprocess": call("subprocess", "call", b"](" + text("touch") + text(str(marker)) + b"e"),
      "getattr_chain": global_op("builtins", "getattr") + b"(" +
                       call("builtins", "__import__", text("os")) + text("system") +
                       b"tR(" + text(cmd) + b"tR",
      "open": call("io", "open", text(str(marker)), text("w")),
      "pickle.loads": call("pickle", "loads", b"C" + bytes([1]) + b"."),
      "copyreg": call("copy_reg", "_reconstructor", global_op("os", "system")),
      "numpy.load": call("numpy", "load", text(str(marker))),
  }


@pytest.mark.parametrize("where", ["top", "nested", "key", "object_array"])
def test_pickles_that_would_run_code_are_refused_before_anything_runs(tmp_path, where):
  marker = tmp_path / "pwned"
  for name, ops in attacks(marker).items():
    path = tmp_path / f"{name}_{where}.pkl"
    path.write_bytes(wrap(ops, where))
    with pytest.raises(errors.DataError) as info:
      embeddings.load_split(str(path))
    message = str(info.value)
    assert str(path) in message, name
    assert "disallowed object" in message, (name, message)
    outer = ops[1:ops.index(b"\n", ops.index(b"\n") + 1)].decode().replace("\n", ".")
    assert outer in message, (name, message)   # names the refused object
    assert not marker.exists(), name


def test_allowed_callables_cannot_be_abused(tmp_path):
  frombuffer = np._core.numeric._frombuffer  # pylint: disable=protected-access
  defaults = frombuffer.__defaults__
  cases = {
      # bytes(size) / bytearray(size): a 10 GB allocation from a 30-byte file.
      "bytes(10**10)": call("builtins", "bytes", b"\x8a\x05\x00\xe4\x0bT\x02"),
      "bytearray(10**10)": call("__builtin__", "bytearray", b"\x8a\x05\x00\xe4\x0bT\x02"),
      # A codec other than latin1 (zlib_codec, rot13, ...).
      "codec": call("_codecs", "encode", text("x"), text("zlib")),
      # An array allocated by shape before any data is read.
      "reconstruct": call("numpy.core.multiarray", "_reconstruct", global_op("numpy", "ndarray"),
                          py2_int(2 ** 30) + b"\x85", py2_str(b"b")),
      # Calling ndarray directly (numpy's pickles never do).
      "ndarray": call("numpy", "ndarray", py2_int(2 ** 30) + b"\x85"),
      # BUILD on an allowed function: would rewrite numpy's _frombuffer for the process.
      "tamper": global_op("numpy._core.numeric", "_frombuffer") + b"N}(" +
                text("__defaults__") + b"(" + text("F") + b"tu\x86b",
  }
  for name, ops in cases.items():
    path = tmp_path / f"{name}.pkl"
    path.write_bytes(wrap(ops, "top"))
    with pytest.raises(errors.DataError, match="refused") as info:
      embeddings.load_split(str(path))
    assert str(path) in str(info.value), name
  assert frombuffer.__defaults__ == defaults


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_every_pickle_protocol_of_legitimate_arrays_still_loads(tmp_path, protocol):
  keys = np.asarray([embedding_keys.make_key(c, i) for c in "abc" for i in range(3)], dtype=object)
  matrix = np.random.default_rng(protocol).standard_normal((9, 5)).astype(np.float32)
  path = tmp_path / "s.pkl"
  path.write_bytes(pickle.dumps({"keys": keys, "embeddings": matrix}, protocol=protocol))
  split = embeddings.load_split(str(path))
  assert split.class_names == ["a", "b", "c"]
  np.testing.assert_array_equal(split.embeddings, matrix)


def test_deep_nesting_is_a_clear_error_not_a_recursion_error(tmp_path):
  path = tmp_path / "deep.pkl"
  deep = b"(" * 1 + b")" + b"\x85" * 200000   # a tuple nested 200k deep as a dict key
  path.write_bytes(b"\x80\x02}(" + deep + py2_int(1) + b"u.")
  with pytest.raises(errors.DataError) as info:
    embeddings.load_split(str(path))
  assert str(path) in str(info.value)


# -- the .npz converter --------------------------------------------------------------
def make_tree(root, dims=(6, 6, 6)):
  rng = np.random.default_rng(0)
  for split, dim in zip(embeddings.SPLITS, dims):
    keys = [embedding_keys.make_key(f"{split}{c}", i, prefix=split) for c in range(3)
            for i in range(4 + c)]
    order = rng.permutation(len(keys))   # rows not grouped by class: order must survive
    embeddings.write_split(str(root / "ds" / "center" / f"{split}_embeddings.pkl"),
                           [keys[i] for i in order],
                           rng.standard_normal((len(keys), dim)))


def test_converter_round_trips_a_tree_and_the_runner_path_prefers_npz(tmp_path):
  make_tree(tmp_path)
  (tmp_path / "ds" / "center" / "notes.pkl").write_bytes(b"not an embeddings file")
  outputs = convert_embeddings.convert_tree(str(tmp_path), log=lambda _: None)
  assert [os.path.basename(p) for p in outputs] == [
      "test_embeddings.npz", "train_embeddings.npz", "val_embeddings.npz"]
  for split in embeddings.SPLITS:
    pkl = str(tmp_path / "ds" / "center" / f"{split}_embeddings.pkl")
    npz = pkl[:-4] + ".npz"
    assert embeddings.split_path(str(tmp_path), "ds", "center", split) == npz
    keys_a, rows_a = embeddings.read_keys_and_embeddings(pkl)
    keys_b, rows_b = embeddings.read_keys_and_embeddings(npz)
    assert keys_a == keys_b
    np.testing.assert_array_equal(rows_a, rows_b)
    with np.load(npz, allow_pickle=False) as archive:  # plain arrays only
      assert sorted(archive.files) == ["embeddings", "keys"]
      assert archive["keys"].dtype.kind == "U" and archive["embeddings"].dtype == np.float32


def test_converter_verifies_and_leaves_nothing_half_written(tmp_path, monkeypatch):
  make_tree(tmp_path)
  folder = tmp_path / "ds" / "center"
  evil = folder / "val_embeddings.pkl"
  marker = tmp_path / "pwned"
  evil.write_bytes(wrap(attacks(marker)["os.system"], "nested"))
  with pytest.raises(errors.DataError, match="disallowed"):
    convert_embeddings.convert_tree(str(tmp_path), log=lambda _: None)
  assert not marker.exists() and not (folder / "val_embeddings.npz").exists()
  make_tree(tmp_path)
  for name in os.listdir(folder):  # (test and train were converted before val failed)
    if name.endswith(".npz"):
      os.remove(folder / name)
  # A conversion killed between writing and renaming: no .npz, no temp file.
  real_replace = os.replace

  def killed(src, dst):
    if dst.endswith("train_embeddings.npz"):
      raise KeyboardInterrupt
    return real_replace(src, dst)
  monkeypatch.setattr(fileio.os, "replace", killed)
  with pytest.raises(KeyboardInterrupt):
    convert_embeddings.convert_tree(str(tmp_path), log=lambda _: None)
  monkeypatch.setattr(fileio.os, "replace", real_replace)
  assert not (folder / "train_embeddings.npz").exists()
  assert not [n for n in os.listdir(folder) if ".tmp-" in n]
  # A write that reads back differently is caught by the verification.
  real_write = embeddings.write_split

  def corrupting(path, keys, rows):
    return real_write(path, keys, np.asarray(rows) + 1e-3)
  monkeypatch.setattr(embeddings, "write_split", corrupting)
  with pytest.raises(errors.DataError, match="does not read back"):
    convert_embeddings.convert_file(str(folder / "test_embeddings.pkl"), log=lambda _: None)
  monkeypatch.setattr(embeddings, "write_split", real_write)
  convert_embeddings.convert_tree(str(tmp_path), remove_pickles=True, log=lambda _: None)
  assert sorted(os.listdir(folder)) == [f"{s}_embeddings.npz" for s in sorted(embeddings.SPLITS)]


def test_converter_cli_errors_are_one_line(tmp_path):
  make_tree(tmp_path)
  script = os.path.join(REPO, "scripts", "convert_embeddings.py")
  for args, fragment in (([f"--input={tmp_path}/missing.pkl"], "no such file"),
                         ([f"--data_path={tmp_path}", f"--input={tmp_path}/x.pkl"], "exactly one"),
                         ([f"--input={tmp_path}/ds/center/train_embeddings.pkl",
                           f"--output={tmp_path}/out.pkl"], "must end in .npz")):
    proc = scripts_run.run([sys.executable, script, *args], capture_output=True, text=True,
                           timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert fragment in proc.stderr.strip().splitlines()[-1]


# -- paths derived from data stay under the user's directory ----------------------------
HOSTILE = ["../../x", "..", ".", "", "/etc/passwd", "a/../../b", "..\\..\\x", "x\x00y",
           "~root", "-rf", ".hidden", "a" * 500, b"../\xff", "\u202e.gpj", "con", "x/./."]


def test_join_under_never_escapes_and_gives_one_component(tmp_path):
  root = tmp_path / "root"
  root.mkdir()
  for name in HOSTILE:
    path = fileio.join_under(str(root), name)
    assert os.path.dirname(path) == os.path.realpath(root), name
    component = os.path.basename(path)
    assert component not in ("", ".", "..") and "/" not in component and len(component) <= 200
  (root / "link").symlink_to(tmp_path)  # a link inside root pointing out of it
  with pytest.raises(errors.UserError, match="outside"):
    fileio.join_under(str(root), "link", "x")


@pytest.mark.slow
def test_extraction_with_hostile_class_and_dataset_names_writes_only_under_out(tmp_path):
  from leo_suite.data import image_sources  # pylint: disable=import-outside-toplevel
  from leo_suite.models import backbones  # pylint: disable=import-outside-toplevel
  from leo_suite.pretrain import classifier as classifier_lib  # pylint: disable=import-outside-toplevel
  from leo_suite.pretrain import extract  # pylint: disable=import-outside-toplevel
  from leo_suite.pretrain import pretrain_config  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  config = pretrain_config.PretrainConfig(image_size=28, channels=1)
  classifier_lib.export_backbone(backbones.build_backbone("conv4", 28, 1), config,
                                 str(tmp_path / "backbone"))
  buffer = io.BytesIO()
  Image.fromarray(np.full([28, 28], 200, np.uint8)).save(buffer, format="PNG")
  hostile = {"train": ["../../escaped", "/abs/escaped"], "val": ["a/../../b"],
             "test": ["..", "x\x00y"]}
  by_class = {name: [image_sources.ImageRecord(name, f"../../{i}.png", f"mem:{i}",
                                               ("bytes", buffer.getvalue())) for i in range(3)]
              for names in hostile.values() for name in names}
  out = tmp_path / "sandbox" / "out"
  with pytest.raises(errors.ConfigError, match="dataset_name"):
    extract.extract_embeddings(str(tmp_path / "backbone"), by_class, hostile, str(out),
                               "../escaped", log=lambda _: None)
  manifest = extract.extract_embeddings(str(tmp_path / "backbone"), by_class, hostile,
                                        str(out), "tiny", log=lambda _: None)
  written = sorted(os.path.relpath(os.path.join(d, f), tmp_path)
                   for d, _, files in os.walk(tmp_path) for f in files)
  assert [w for w in written if not w.startswith("backbone")] == [
      os.path.join("sandbox", "out", "tiny", "center", name) for name in
      ("manifest.json", "test_embeddings.pkl", "train_embeddings.pkl", "val_embeddings.pkl")]
  assert sorted(manifest["class_names"].values()) == sorted(sum(hostile.values(), []))
  for split in embeddings.SPLITS:
    loaded = embeddings.load_dataset_split(str(out), "tiny", "center", split)
    assert loaded.num_classes == len(hostile[split])
