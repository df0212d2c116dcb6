"""Tests for the embeddings downloader on a tiny real-format release.

The release is built with `embeddings.write_split` (LEO-format pickles) and
served from a loopback HTTP server whose handler implements (or ignores)
Range requests and can drop the connection mid-body.
"""

import hashlib
import http.server
import io
import os
import socket
import sys
import threading
import zipfile

import numpy as np
import pytest

from leo_suite import errors
from leo_suite.data import download
from leo_suite.data import embedding_keys
from leo_suite.data import embeddings
from leo_suite.data import http_fetch
from leo_suite.data import release_archive

from tests import scripts_run

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "scripts", "download_embeddings.py")


# ----------------------------------------------------------------------------
# Fixtures: a tiny release and a loopback server.


def _build_tree(root, pairs=release_archive.EXPECTED_CROPS, dim=8):
  """Writes <root>/embeddings/<dataset>/<crop>/<split>_embeddings.pkl files."""
  rng = np.random.default_rng(0)
  files = {}
  for dataset, crop in pairs:
    for split_index, split in enumerate(release_archive.SPLITS):
      classes = [f"n{split_index}{c:04d}" for c in range(2)]
      keys = [embedding_keys.make_key(c, i, prefix=crop, ext="JPEG")
              for c in classes for i in range(3)]
      name = f"embeddings/{dataset}/{crop}/{split}_embeddings.pkl"
      path = os.path.join(root, *name.split("/"))
      embeddings.write_split(path, keys, rng.normal(size=(len(keys), dim)))
      files[name] = path
  return files


def _zip_members(path, members, compression=zipfile.ZIP_DEFLATED):
  """Writes a zip of (name, bytes) members; bytes None means a directory."""
  with zipfile.ZipFile(path, "w", compression) as archive:
    for name, payload in members:
      if payload is None:
        archive.writestr(zipfile.ZipInfo(name), b"")
      else:
        archive.writestr(zipfile.ZipInfo(name), payload, compress_type=compression)
  return path


def _release_members(files):
  members, dirs = [], set()
  for name in sorted(files):
    parts = name.split("/")
    for depth in range(1, len(parts)):
      directory = "/".join(parts[:depth]) + "/"
      if directory not in dirs:
        dirs.add(directory)
        members.append((directory, None))
    with open(files[name], "rb") as handle:
      members.append((name, handle.read()))
  return members


@pytest.fixture
def release(tmp_path):
  """(zip path, zip bytes, {member name: source pickle path})."""
  files = _build_tree(str(tmp_path / "src"))
  archive = _zip_members(str(tmp_path / "embeddings.zip"), _release_members(files))
  with open(archive, "rb") as handle:
    return archive, handle.read(), files


class _Server:
  """Serves `payload` at /embeddings.zip on 127.0.0.1, recording requests."""

  def __init__(self, payload, support_range=True, drop_after=None):
    self.payload = payload
    self.requests = []  # (Range header or None, status sent, body bytes sent)
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):

      def log_message(self, *args):  # keep pytest output clean
        pass

      def do_GET(self):  # pylint: disable=invalid-name
        if self.path != "/embeddings.zip":
          self.send_error(404)
          server.requests.append((self.headers.get("Range"), 404, 0))
          return
        body, status = server.payload, 200
        range_header = self.headers.get("Range")
        headers = {}
        if support_range and range_header:
          start = int(range_header.split("=")[1].split("-")[0])
          if start >= len(body):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            server.requests.append((range_header, 416, 0))
            return
          headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
          body, status = body[start:], 206
        self.send_response(status)
        for key, value in headers.items():
          self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        first = not server.requests
        if first and drop_after is not None:  # a broken first transfer
          body = body[:drop_after]
          self.close_connection = True
        self.wfile.write(body)
        server.requests.append((range_header, status, len(body)))

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/embeddings.zip"
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

  def __enter__(self):
    self.thread.start()
    return self

  def __exit__(self, *exc):
    self.httpd.shutdown()
    self.httpd.server_close()


def _closed_port():
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def _all_files(root):
  found = []
  for directory, _, names in os.walk(root):
    found.extend(os.path.relpath(os.path.join(directory, n), root) for n in names)
  return sorted(found)


def _assert_installed(dest, files):
  """Every split of the release loads from dest and equals its source."""
  for name, source in files.items():
    _, dataset, crop, split_file = name.split("/")
    installed = embeddings.load_split(os.path.join(dest, dataset, crop, split_file))
    expected = embeddings.load_split(source)
    np.testing.assert_array_equal(installed.embeddings, expected.embeddings)
    assert installed.class_names == expected.class_names
    assert installed.image_names == expected.image_names


def _run_cli(*args):
  return scripts_run.run([sys.executable, SCRIPT, *args], capture_output=True,
                         text=True, timeout=60, check=False)


def _flip_member_byte(archive, member, fraction=0.5):
  """Flips the byte at `fraction` of `member`'s stored (compressed) data."""
  with zipfile.ZipFile(archive) as zip_file:
    info = zip_file.getinfo(member)
  with open(archive, "r+b") as handle:
    handle.seek(info.header_offset + 26)
    name_length, extra_length = np.frombuffer(handle.read(4), "<u2")
    position = (info.header_offset + 30 + int(name_length) + int(extra_length) +
                int(info.compress_size * fraction))
    handle.seek(position)
    byte = handle.read(1)[0]
    handle.seek(position)
    handle.write(bytes([byte ^ 0xFF]))


# ----------------------------------------------------------------------------
# Download + unpack.


def test_full_download_installs_loadable_splits(tmp_path, release):
  _, payload, files = release
  dest = str(tmp_path / "out" / "embeddings")
  log = io.StringIO()
  with _Server(payload) as server:
    layout = download.install(dest, url=server.url, stream=log)
  assert sorted(layout) == sorted(release_archive.EXPECTED_CROPS)
  assert server.requests == [(None, 200, len(payload))]
  _assert_installed(dest, files)
  assert not os.path.exists(os.path.join(dest, release_archive.DOWNLOAD_DIR))
  assert _all_files(dest) == sorted(
      os.path.join(*n.split("/")[1:]) for n in files)
  text = log.getvalue()
  assert f"{len(payload):,} / {len(payload):,} bytes (100.0%)" in text
  assert "MB/s" in text
  assert hashlib.sha256(payload).hexdigest() in text  # printed for --sha256


def test_resume_sends_range_and_rebuilds_identical_file(tmp_path, release):
  _, payload, _ = release
  part = str(tmp_path / "x.part")
  offset = len(payload) // 3
  with open(part, "wb") as handle:
    handle.write(payload[:offset])
  with _Server(payload) as server:
    size = http_fetch.fetch(server.url, part, stream=None)
  assert server.requests == [(f"bytes={offset}-", 206, len(payload) - offset)]
  assert size == len(payload)
  with open(part, "rb") as handle:
    assert handle.read() == payload


def test_interrupted_download_keeps_part_and_next_run_resumes(tmp_path, release):
  _, payload, files = release
  dest = str(tmp_path / "embeddings")
  cut = len(payload) // 2
  with _Server(payload, drop_after=cut) as server:
    with pytest.raises(http_fetch.DownloadError) as failure:
      download.install(dest, url=server.url, stream=None)
    message = str(failure.value)
    assert server.url in message and "--archive" in message
    assert release_archive.part_path(dest) in message and "--clean" in message
    assert "\n" not in message
    # Only the resumable .part exists; nothing where the runner reads.
    assert _all_files(dest) == [os.path.join(release_archive.DOWNLOAD_DIR,
                                             "embeddings.zip.part")]
    assert os.path.getsize(release_archive.part_path(dest)) == cut
    download.install(dest, url=server.url, keep_archive=True, stream=None)
  assert server.requests[1] == (f"bytes={cut}-", 206, len(payload) - cut)
  with open(os.path.join(dest, release_archive.DOWNLOAD_DIR, "embeddings.zip"), "rb") as f:
    assert f.read() == payload
  _assert_installed(dest, files)


def test_server_ignoring_range_restarts_from_zero(tmp_path, release):
  _, payload, _ = release
  part = str(tmp_path / "x.part")
  with open(part, "wb") as handle:  # not even a prefix of the payload
    handle.write(b"\xa5" * 1000)
  log = io.StringIO()
  with _Server(payload, support_range=False) as server:
    http_fetch.fetch(server.url, part, stream=log)
  assert server.requests == [("bytes=1000-", 200, len(payload))]
  assert "ignored the Range request" in log.getvalue()
  with open(part, "rb") as handle:
    assert handle.read() == payload


def test_complete_part_is_accepted_on_416(tmp_path, release):
  _, payload, _ = release
  part = str(tmp_path / "x.part")
  with open(part, "wb") as handle:
    handle.write(payload)
  with _Server(payload) as server:
    assert http_fetch.fetch(server.url, part, stream=None) == len(payload)
  assert server.requests == [(f"bytes={len(payload)}-", 416, 0)]
  with open(part, "rb") as handle:
    assert handle.read() == payload


def test_http_error_is_one_clear_line_and_leaves_nothing(tmp_path, release):
  _, payload, _ = release
  dest = str(tmp_path / "embeddings")
  with _Server(payload) as server:
    url = server.url.replace("embeddings.zip", "missing.zip")
    with pytest.raises(http_fetch.DownloadError, match="HTTP 404") as failure:
      download.install(dest, url=url, stream=None)
  assert url in str(failure.value) and "nothing was written" in str(failure.value)
  assert not os.path.exists(dest)


def test_stalled_server_times_out(tmp_path):
  with socket.socket() as listener:  # accepts connections, never answers
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/embeddings.zip"
    with pytest.raises(http_fetch.DownloadError, match="timed out"):
      download.install(str(tmp_path / "e"), url=url, timeout=0.5, stream=None)
  assert not os.path.exists(tmp_path / "e")


# ----------------------------------------------------------------------------
# Verification refuses bad archives before anything is unpacked.


@pytest.mark.parametrize("compression, fraction", [
    (zipfile.ZIP_STORED, 0.5),
    (zipfile.ZIP_DEFLATED, 0.5),  # data damaged: CRC mismatch
    (zipfile.ZIP_DEFLATED, 0.0),  # deflate block header damaged: zlib error
])
def test_corrupt_member_is_refused_and_old_install_kept(tmp_path, release,
                                                       compression, fraction):
  _, _, files = release
  archive = _zip_members(str(tmp_path / "bad.zip"), _release_members(files),
                         compression)
  member = "embeddings/miniImageNet/center/val_embeddings.pkl"
  _flip_member_byte(archive, member, fraction)
  dest = str(tmp_path / "embeddings")
  old_file = os.path.join(dest, "miniImageNet", "center", "train_embeddings.pkl")
  os.makedirs(os.path.dirname(old_file))
  with open(old_file, "wb") as handle:
    handle.write(b"previous install")
  with pytest.raises(errors.DataError) as failure:
    download.install(dest, archive=archive, stream=None)
  assert repr(member) in str(failure.value)
  assert "CRC" in str(failure.value) or "corrupt" in str(failure.value)
  assert _all_files(dest) == [os.path.join("miniImageNet", "center",
                                           "train_embeddings.pkl")]
  with open(old_file, "rb") as handle:
    assert handle.read() == b"previous install"


def test_corrupt_download_is_removed_and_nothing_unpacked(tmp_path, release):
  archive, _, _ = release
  _flip_member_byte(archive, "embeddings/tieredImageNet/center/test_embeddings.pkl")
  with open(archive, "rb") as handle:
    payload = handle.read()
  dest = str(tmp_path / "embeddings")
  with _Server(payload) as server:
    with pytest.raises(errors.DataError, match="bad archive was removed"):
      download.install(dest, url=server.url, stream=None)
  assert not os.path.exists(dest)


def test_truncated_archive_is_refused(tmp_path, release):
  _, payload, _ = release
  archive = str(tmp_path / "short.zip")
  with open(archive, "wb") as handle:
    handle.write(payload[:len(payload) - 100])  # loses the central directory
  with pytest.raises(errors.DataError, match="not a readable zip"):
    download.install(str(tmp_path / "e"), archive=archive, stream=None)
  assert not os.path.exists(tmp_path / "e")


def test_sha256_is_checked(tmp_path, release):
  archive, payload, files = release
  dest = str(tmp_path / "embeddings")
  wrong = hashlib.sha256(payload + b"x").hexdigest()
  with pytest.raises(errors.DataError, match=f"expected {wrong}"):
    download.install(dest, archive=archive, sha256=wrong, stream=None)
  assert not os.path.exists(dest)
  right = hashlib.sha256(payload).hexdigest().upper()  # case does not matter
  download.install(dest, archive=archive, sha256=right, stream=None)
  _assert_installed(dest, files)
  with pytest.raises(errors.ConfigError, match="64 hexadecimal"):
    download.install(dest, archive=archive, sha256="abc", stream=None)


@pytest.mark.parametrize("evil_name", [
    "../evil_embeddings.pkl",
    "embeddings/../../evil_embeddings.pkl",
    "embeddings/miniImageNet/../../../evil_embeddings.pkl",
    "/tmp/leo_suite_evil_embeddings.pkl",
    "embeddings\\..\\..\\evil_embeddings.pkl",
    "C:/evil_embeddings.pkl",
])
def test_zip_slip_member_is_refused(tmp_path, release, evil_name):
  _, _, files = release
  work = tmp_path / "work"
  archive = _zip_members(str(tmp_path / "evil.zip"),
                         _release_members(files) + [(evil_name, b"owned")])
  with zipfile.ZipFile(archive) as zip_file:
    assert evil_name in zip_file.namelist()  # the fixture really holds it
  dest = str(work / "a" / "embeddings")
  with pytest.raises(errors.DataError, match="zip-slip") as failure:
    download.install(dest, archive=archive, stream=None)
  assert repr(evil_name) in str(failure.value)
  assert not os.path.exists(work)
  assert not os.path.exists("/tmp/leo_suite_evil_embeddings.pkl")


def test_symlink_member_is_refused(tmp_path, release):
  _, _, files = release
  link = zipfile.ZipInfo("embeddings/miniImageNet/center/link")
  link.external_attr = (0o120777 << 16)
  archive = str(tmp_path / "link.zip")
  with zipfile.ZipFile(archive, "w") as zip_file:
    for name, payload in _release_members(files):
      zip_file.writestr(zipfile.ZipInfo(name), payload or b"")
    zip_file.writestr(link, "/etc/passwd")
  with pytest.raises(errors.DataError, match="symbolic link"):
    download.install(str(tmp_path / "e"), archive=archive, stream=None)
  assert not os.path.exists(tmp_path / "e")


@pytest.mark.parametrize("extra, match", [
    (("embeddings/README.txt", b"hi"), "outside <dataset>/<crop>/"),
    (("other/miniImageNet/center/train_embeddings.pkl", b"x"), "not under embeddings/"),
    (("embeddings/CIFAR/center/train_embeddings.pkl", b"x"), "unknown dataset"),
    (("embeddings/tieredImageNet/multiview/train_embeddings.pkl", b"x"),
     "unknown crop"),
    (("embeddings/miniImageNet/center/extra_embeddings.pkl", b"x"),
     "not a <split>_embeddings.pkl"),
    (("embeddings/miniImageNet/center/sub/", None), "directory below <crop>/"),
])
def test_member_outside_layout_is_refused(tmp_path, release, extra, match):
  _, _, files = release
  archive = _zip_members(str(tmp_path / "odd.zip"),
                         _release_members(files) + [extra])
  with pytest.raises(errors.DataError, match=match):
    download.install(str(tmp_path / "e"), archive=archive, stream=None)
  assert not os.path.exists(tmp_path / "e")


def test_incomplete_or_empty_release_is_refused(tmp_path, release):
  _, _, files = release
  without_test = {n: p for n, p in files.items()
                  if n != "embeddings/miniImageNet/multiview/test_embeddings.pkl"}
  archive = _zip_members(str(tmp_path / "inc.zip"), _release_members(without_test))
  with pytest.raises(errors.DataError,
                     match="miniImageNet/multiview has no test_embeddings.pkl"):
    download.install(str(tmp_path / "e"), archive=archive, stream=None)
  empty = _zip_members(str(tmp_path / "empty.zip"), [("embeddings/", None)])
  with pytest.raises(errors.DataError, match="no embeddings/<dataset>"):
    download.install(str(tmp_path / "e"), archive=empty, stream=None)
  assert not os.path.exists(tmp_path / "e")


def test_partial_release_replaces_only_its_crops(tmp_path):
  files = _build_tree(str(tmp_path / "src"), pairs=[("miniImageNet", "center")])
  archive = _zip_members(
      str(tmp_path / "mini.zip"),
      _release_members(files) + [("__MACOSX/embeddings/._x", b"litter")])
  dest = tmp_path / "embeddings"
  kept = dest / "miniImageNet" / "multiview" / "train_embeddings.pkl"
  stale = dest / "miniImageNet" / "center" / "stale.txt"
  for path in (kept, stale):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"old")
  log = io.StringIO()
  layout = download.install(str(dest), archive=archive, stream=log)
  assert list(layout) == [("miniImageNet", "center")]
  _assert_installed(str(dest), files)
  assert kept.read_bytes() == b"old"  # another crop is left alone
  assert not stale.exists()  # the crop directory was replaced as a whole
  assert not (dest / "__MACOSX").exists()
  assert "no miniImageNet/multiview, tieredImageNet/center" in log.getvalue()
  assert os.path.exists(archive)  # a user's --archive is never removed


# ----------------------------------------------------------------------------
# Unpacking is atomic.


def test_failed_unpack_leaves_previous_install_untouched(tmp_path, release, monkeypatch):
  archive, _, _ = release
  dest = tmp_path / "embeddings"
  old = dest / "tieredImageNet" / "center" / "train_embeddings.pkl"
  old.parent.mkdir(parents=True)
  old.write_bytes(b"previous install")
  real_extract = release_archive._extract_file  # pylint: disable=protected-access
  calls = []

  def extract_then_fail(zip_file, name, target):
    calls.append(name)
    if len(calls) == 5:  # half-written file, then "disk full"
      with open(target, "wb") as handle:
        handle.write(b"half")
      raise OSError(28, "No space left on device")
    real_extract(zip_file, name, target)

  monkeypatch.setattr(release_archive, "_extract_file", extract_then_fail)
  with pytest.raises(errors.DataError, match="No space left on device.*nothing was"):
    download.install(str(dest), archive=archive, stream=None)
  assert len(calls) == 5
  assert _all_files(str(dest)) == [os.path.join("tieredImageNet", "center",
                                                "train_embeddings.pkl")]
  assert old.read_bytes() == b"previous install"


def test_leftovers_of_a_killed_run_are_recovered(tmp_path, release):
  archive, _, files = release
  dest = tmp_path / "embeddings"
  staging = dest / release_archive.DOWNLOAD_DIR / "unpack-killed" / "miniImageNet"
  staging.mkdir(parents=True)
  (staging / "half.pkl").write_bytes(b"half")
  # Killed between replace_directory's two renames: only center.old exists.
  old = dest / "tieredImageNet" / "center.old"
  old.mkdir(parents=True)
  (old / "train_embeddings.pkl").write_bytes(b"old")
  download.install(str(dest), archive=archive, stream=None)
  _assert_installed(str(dest), files)
  assert not (dest / release_archive.DOWNLOAD_DIR).exists()
  assert not old.exists()


def test_concurrent_run_is_refused(tmp_path, release):
  archive, _, _ = release
  dest = tmp_path / "embeddings"
  (dest / release_archive.DOWNLOAD_DIR).mkdir(parents=True)
  lock = str(dest / release_archive.DOWNLOAD_DIR)
  with download._exclusive(lock):  # pylint: disable=protected-access
    with pytest.raises(errors.UserError, match="another download_embeddings run"):
      download.install(str(dest), archive=archive, stream=None)
  assert _all_files(str(dest)) == []


# ----------------------------------------------------------------------------
# The command-line tool.


def test_cli_unreachable_url_is_one_line_exit_2_no_files(tmp_path):
  url = f"http://127.0.0.1:{_closed_port()}/embeddings.zip"
  dest = tmp_path / "out" / "embeddings"
  result = _run_cli("--dest", str(dest), "--url", url, "--timeout", "5")
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: could not download")
  assert url in lines[0] and "--archive path/to/embeddings.zip" in lines[0]
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "out").exists()


def test_cli_interrupted_download_keeps_only_the_part(tmp_path, release):
  _, payload, _ = release
  dest = tmp_path / "embeddings"
  with _Server(payload, drop_after=100) as server:
    result = _run_cli("--dest", str(dest), "--url", server.url)
  assert result.returncode == 2
  assert "Traceback" not in result.stderr
  assert "the 100 bytes received are kept in" in result.stderr
  assert _all_files(str(dest)) == [os.path.join(release_archive.DOWNLOAD_DIR,
                                                "embeddings.zip.part")]
  result = _run_cli("--dest", str(dest), "--clean")
  assert result.returncode == 0
  assert not (dest / release_archive.DOWNLOAD_DIR).exists()


def test_cli_local_archive(tmp_path, release):
  archive, _, files = release
  dest = tmp_path / "embeddings"
  result = _run_cli("--dest", str(dest), "--archive", archive)
  assert result.returncode == 0, result.stderr
  assert f"--data_path {dest}" in result.stdout
  _assert_installed(str(dest), files)
  missing = _run_cli("--dest", str(dest), "--archive", str(tmp_path / "no.zip"))
  assert missing.returncode == 2
  assert "no such file" in missing.stderr and "Traceback" not in missing.stderr


def test_cli_refused_archive_exit_2(tmp_path, release):
  _, _, files = release
  archive = _zip_members(str(tmp_path / "evil.zip"),
                         _release_members(files) + [("../x_embeddings.pkl", b"x")])
  result = _run_cli("--dest", str(tmp_path / "e"), "--archive", archive)
  assert result.returncode == 2
  assert result.stderr.count("\n") == 1 and "zip-slip" in result.stderr
  assert not (tmp_path / "e").exists()
