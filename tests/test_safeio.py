"""leo_suite.safeio: names, file kinds and sizes from outside are checked before use."""

import contextlib
import io
import os
import resource
import signal
import struct
import time
import zipfile
import zlib

import numpy as np
import pytest

from leo_suite import errors
from leo_suite import safe_decode
from leo_suite import safeio


@contextlib.contextmanager
def deadline(seconds):
  """Fails the test (instead of hanging it) if the block takes longer."""
  def expired(signum, frame):
    raise AssertionError(f"took longer than {seconds} s")
  previous = signal.signal(signal.SIGALRM, expired)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def peak_rss_bytes():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB


# ------------------------------------------------------------------ names


@pytest.mark.parametrize("name", ["../x", "..", ".", "", "/abs", "sub/x", "a\\b", "a\0b",
                                  "line\nbreak", b"caf\xe9", "caf\udce9", "x" * 256])
def test_check_name_refuses_what_is_not_one_component(name):
  with pytest.raises(errors.DataError) as caught:
    safeio.check_name(name, "split name in manifest.json")
  message = str(caught.value)
  assert message.startswith("split name in manifest.json")
  assert "\n" not in message and "\0" not in message and len(message) <= safeio.MAX_MESSAGE
  message.encode("utf-8")  # printable whatever the name's bytes


def test_check_name_accepts_names_and_raises_the_callers_error_class():
  for name in ["train", "mini-ImageNet_v2", "été", "a.b", "..x", "x" * 255]:
    assert safeio.check_name(name, "split") == name
  assert safeio.check_name(b"train", "split") == "train"
  with pytest.raises(errors.ConfigError, match=r"^--dataset_name '\.\./x' must be a single"):
    safeio.check_name("../x", "--dataset_name", error=errors.ConfigError)


def test_display_name_escapes_and_truncates():
  assert safeio.display_name(b"caf\xe9.png") == "caf\\xe9.png"
  assert safeio.display_name(os.fsdecode(b"caf\xe9.png")) == "caf\\xe9.png"
  assert safeio.display_name("a\nb\tc\x1b") == "a\\nb\\tc\\x1b"
  assert safeio.display_name("été") == "été"
  long = safeio.display_name("y" * 1000)
  assert len(long) == safeio.MAX_DISPLAY + 3 and long.endswith("...")
  assert safeio.display_name(b"\xff" * 1000).count("\\xff") == safeio.MAX_DISPLAY // 4


def test_child_path_stays_inside_its_root(tmp_path):
  root = tmp_path / "root"
  (root / "train").mkdir(parents=True)
  assert safeio.child_path(str(root), "train", "a.npy") == os.path.join(str(root), "train",
                                                                         "a.npy")
  outside = tmp_path / "outside"
  outside.mkdir()
  os.symlink(outside, root / "escape")
  with pytest.raises(errors.DataError, match="outside that folder"):
    safeio.child_path(str(root), "escape", what="split name")
  with pytest.raises(errors.DataError, match="must be a single name"):
    safeio.child_path(str(root), "../../../outside/escaped", what="split name")
  inside = root / "alias"
  os.symlink(root / "train", inside)  # a link that stays inside is fine
  assert safeio.child_path(str(root), "alias") == str(inside)


# ------------------------------------------------------------------ files


def test_fifo_is_refused_without_hanging(tmp_path):
  fifo = tmp_path / "train_embeddings.pkl"
  os.mkfifo(fifo)
  start = time.monotonic()
  with deadline(5), pytest.raises(errors.DataError, match="FIFO"):
    safeio.read_bytes(str(fifo))
  assert time.monotonic() - start < 1


def test_devices_directories_and_missing_files_are_refused(tmp_path):
  link = tmp_path / "support.pkl"
  os.symlink("/dev/zero", link)
  with deadline(5), pytest.raises(errors.DataError, match="character device"):
    safeio.read_bytes(str(link))
  with pytest.raises(errors.DataError, match="is a directory"):
    safeio.read_bytes(str(tmp_path))
  with pytest.raises(errors.DataError, match="no such file"):
    safeio.read_bytes(str(tmp_path / "missing"))
  dangling = tmp_path / "dangling"
  os.symlink(tmp_path / "nowhere", dangling)
  with pytest.raises(errors.DataError, match="no such file"):
    safeio.open_regular(str(dangling))
  os.symlink("loop", tmp_path / "loop")
  with pytest.raises(errors.DataError, match="not a regular file"):
    safeio.open_regular(str(tmp_path / "loop"))


def test_size_cap_is_checked_before_reading(tmp_path, monkeypatch):
  path = tmp_path / "big.pkl"
  path.write_bytes(b"x" * 1000)
  assert safeio.read_bytes(str(path), max_bytes=1000) == b"x" * 1000
  with pytest.raises(errors.DataError) as caught:
    safeio.read_bytes(str(path), max_bytes=999)
  assert str(caught.value) == (
      f"{path}: 1,000 bytes, more than the cap of 999 bytes; refused before reading (if the "
      "file is genuine, set LEO_SUITE_MAX_FILE_BYTES higher)")
  monkeypatch.setenv("LEO_SUITE_MAX_ARRAY_BYTES", "500")  # the arrays' cap is honoured ...
  with pytest.raises(errors.DataError, match="cap of 500 bytes"):
    safeio.read_bytes(str(path))
  monkeypatch.setenv("LEO_SUITE_MAX_FILE_BYTES", "2000")  # ... unless the file cap is set
  assert len(safeio.read_bytes(str(path))) == 1000
  monkeypatch.setenv("LEO_SUITE_MAX_FILE_BYTES", "lots")
  with pytest.raises(errors.ConfigError, match="^LEO_SUITE_MAX_FILE_BYTES=lots: expected a"):
    safeio.read_bytes(str(path))


def test_a_file_that_grows_while_read_is_refused(tmp_path):
  path = tmp_path / "growing.pkl"
  path.write_bytes(b"y" * 10)
  for read in (lambda h: h.read(), lambda h: h.read(100), lambda h: h.readline(),
               lambda h: h.readinto(bytearray(100)), lambda h: h.raw.readall()):
    with safeio.open_regular(str(path), max_bytes=10) as handle:
      assert handle.name == str(path)
      with open(path, "ab") as grow:
        grow.write(b"z")
      with pytest.raises(errors.DataError, match="growing.pkl: holds more than the cap of 10"):
        read(handle)
    path.write_bytes(b"y" * 10)
  with safeio.open_regular(str(path), max_bytes=10) as handle:  # seeking and reading up to the cap
    handle.seek(4)
    assert handle.read() == b"y" * 6 and handle.tell() == 10
  with pytest.raises(errors.DataError, match="more than the cap of 10 bytes"):
    safeio.read_capped(io.BytesIO(b"y" * 11), 10, "growing.pkl")
  assert safeio.read_capped(io.BytesIO(b"y" * 10), 10, "exact.pkl") == b"y" * 10


# ------------------------------------------------------------------ images


def png_claiming(width, height):
  """A 1x1 PNG whose header claims `width` x `height` (IHDR patched, CRC recomputed)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  buffer = io.BytesIO()
  Image.new("RGB", (1, 1)).save(buffer, format="PNG")
  data = bytearray(buffer.getvalue())
  assert data[12:16] == b"IHDR"
  data[16:24] = struct.pack(">II", width, height)
  data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
  return bytes(data)


def test_huge_image_is_refused_from_its_header(tmp_path, monkeypatch):
  from PIL import ImageFile  # pylint: disable=import-outside-toplevel
  def no_decoding(self):
    raise AssertionError("decoded")
  monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
  data = png_claiming(13000, 13000)
  assert len(data) < 100
  before = peak_rss_bytes()
  with pytest.raises(errors.DataError) as caught:
    safe_decode.check_image_header(data, "class_a/img.png")
  assert str(caught.value) == (
      "class_a/img.png: 13000x13000 = 169,000,000 pixels, more than the cap of 16,777,216; "
      "refused before decoding (if the image is genuine, set LEO_SUITE_MAX_IMAGE_PIXELS higher)")
  path = tmp_path / "huge.png"
  path.write_bytes(data)
  with pytest.raises(errors.DataError, match="169,000,000 pixels"):
    safe_decode.open_image(str(path), "huge.png")
  with pytest.raises(errors.DataError, match="refused before decoding"):  # PIL's own error
    safe_decode.check_image_header(png_claiming(30000, 30000), "bomb.png", max_pixels=10**10)
  assert peak_rss_bytes() - before < 50 * 2**20
  monkeypatch.setenv("LEO_SUITE_MAX_IMAGE_PIXELS", str(13000 * 13000))
  assert safe_decode.check_image_header(data, "huge.png") == (13000, 13000)


def test_small_image_opens_and_garbage_is_refused():
  from PIL import Image  # pylint: disable=import-outside-toplevel
  buffer = io.BytesIO()
  Image.new("L", (5, 3), color=7).save(buffer, format="PNG")
  image = safe_decode.open_image(buffer.getvalue(), "small.png")
  assert image.size == (5, 3) and np.asarray(image).sum() == 7 * 15
  with pytest.raises(errors.DataError, match="^x.png: not an image PIL can read"):
    safe_decode.check_image_header(b"not an image", "x.png")


# ------------------------------------------------------------------ zip and npz


def zip_bytes(members, compression=zipfile.ZIP_DEFLATED):
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w", compression) as zip_file:
    for name, data in members.items():
      zip_file.writestr(name, data)
  return bytearray(buffer.getvalue())


def patch_member(data, file_size=None, flag_bits=None):
  """The first member's declared size / flags rewritten in both of its headers."""
  local, central = data.find(b"PK\x03\x04"), data.find(b"PK\x01\x02")
  if file_size is not None:
    data[local + 22:local + 26] = struct.pack("<I", file_size)
    data[central + 24:central + 28] = struct.pack("<I", file_size)
  if flag_bits is not None:
    data[local + 6:local + 8] = struct.pack("<H", flag_bits)
    data[central + 8:central + 10] = struct.pack("<H", flag_bits)
  return bytes(data)


def test_zip_member_with_a_huge_declared_size_is_refused():
  data = patch_member(zip_bytes({"a.png": b"\0" * 2**20}), file_size=2**31)
  with zipfile.ZipFile(io.BytesIO(data)) as zip_file:
    with pytest.raises(errors.DataError, match=r"member 'a.png' expands .* to 2,147,483,648"):
      safe_decode.check_zip_members(zip_file, "images.zip")
    with pytest.raises(errors.DataError, match="more than the cap of 1,000,000 bytes"):
      safe_decode.check_zip_members(zip_file, "images.zip", max_member_bytes=10**6)
    with pytest.raises(errors.DataError, match="compression bomb"):
      safe_decode.read_zip_member(zip_file, "a.png", what="images.zip")


def test_zip_member_whose_header_lies_is_cut_at_its_cap():
  data = patch_member(zip_bytes({"a.png": b"\0" * 2**22}), file_size=1000)
  with zipfile.ZipFile(io.BytesIO(data)) as zip_file:
    assert safe_decode.check_zip_members(zip_file, "images.zip") == 1000
    before = peak_rss_bytes()
    with pytest.raises(errors.DataError, match="^images.zip: member 'a.png'"):
      safe_decode.read_zip_member(zip_file, "a.png", max_bytes=5000, what="images.zip")
    assert peak_rss_bytes() - before < 50 * 2**20
  honest = zip_bytes({"a.png": b"ab" * 600})
  with zipfile.ZipFile(io.BytesIO(bytes(honest))) as zip_file:
    assert safe_decode.read_zip_member(zip_file, "a.png") == b"ab" * 600
    with pytest.raises(errors.DataError, match="more than the cap of 1,000 bytes"):
      safe_decode.read_zip_member(zip_file, "a.png", max_bytes=1000, what="images.zip")
    with pytest.raises(errors.DataError, match="no member 'b.png'"):
      safe_decode.read_zip_member(zip_file, "b.png", what="images.zip")


def test_encrypted_member_is_refused_by_name():
  data = patch_member(zip_bytes({"secret\x1b.png": b"x" * 100}), flag_bits=0x1)
  with zipfile.ZipFile(io.BytesIO(data)) as zip_file:
    for call in (lambda: safe_decode.check_zip_members(zip_file, "images.zip"),
                 lambda: safe_decode.read_zip_member(zip_file, zip_file.infolist()[0],
                                                what="images.zip")):
      with pytest.raises(errors.DataError) as caught:
        call()
      assert str(caught.value) == (
          "images.zip: member 'secret\\x1b.png' is encrypted (password-protected); extract it "
          "or re-create the archive without a password")


def test_member_parts_are_checked_names():
  assert safe_decode.member_parts("images/Alphabet/char01/a.png", "omniglot.zip") == (
      "images", "Alphabet", "char01", "a.png")
  assert safe_decode.member_parts(zipfile.ZipInfo("images/Alphabet/"), "o.zip") == ("images",
                                                                                "Alphabet")
  for name in ("/etc/passwd", "images/../../x.png", "a//b.png", "a\\b.png", "./a.png"):
    with pytest.raises(errors.DataError, match="^o.zip: member '.*': part '.*' "):
      safe_decode.member_parts(name, "o.zip")


def test_npz_bomb_is_refused_before_decompressing(tmp_path):
  genuine = tmp_path / "train_embeddings.npz"
  rng = np.random.default_rng(0)
  np.savez_compressed(genuine, embeddings=rng.normal(size=(50, 64)).astype(np.float32),
                      labels=np.arange(50))
  total = safe_decode.check_npz(str(genuine))
  with np.load(genuine) as arrays:
    assert total == sum(a.nbytes for a in arrays.values()) + 2 * 128  # two .npy headers
  bomb = tmp_path / "bomb.npz"
  np.savez_compressed(bomb, embeddings=np.zeros(2**22, np.float32))  # 16 MiB of zeros
  assert bomb.stat().st_size < 100_000
  with pytest.raises(errors.DataError, match="embeddings.npy' expands .* a compression bomb"):
    safe_decode.check_npz(str(bomb))
  assert safe_decode.check_npz(str(bomb), max_ratio=10**6) > 2**24
  with pytest.raises(errors.DataError, match="more than the cap of 1,000,000 bytes"):
    safe_decode.check_npz(str(bomb), max_bytes=10**6, max_ratio=10**6)
  lying = tmp_path / "lying.npz"
  lying.write_bytes(patch_member(bytearray(genuine.read_bytes()), file_size=2_660_000_000))
  with zipfile.ZipFile(lying) as zip_file:
    with pytest.raises(errors.DataError, match="2,660,000,000"):
      safe_decode.check_npz(zip_file)
  (tmp_path / "garbage.npz").write_bytes(b"not a zip")
  with pytest.raises(errors.DataError, match="not a readable npz"):
    safe_decode.check_npz(str(tmp_path / "garbage.npz"))


def test_readers_work_through_open_regular(tmp_path):
  import pickle  # pylint: disable=import-outside-toplevel
  value = {"keys": ["a", "b"], "embeddings": np.arange(6.0).reshape(2, 3)}
  (tmp_path / "x.pkl").write_bytes(pickle.dumps(value))
  with safeio.open_regular(str(tmp_path / "x.pkl")) as handle:
    loaded = pickle.load(handle)
  assert loaded["keys"] == ["a", "b"] and np.array_equal(loaded["embeddings"], value["embeddings"])
  np.savez_compressed(tmp_path / "x.npz", embeddings=value["embeddings"])
  with safeio.open_regular(str(tmp_path / "x.npz")) as handle:
    with np.load(handle) as arrays:
      assert np.array_equal(arrays["embeddings"], value["embeddings"])
