"""Downloads, verifies and unpacks DeepMind's released LEO embeddings.

The release (`DEFAULT_URL`, see the deepmind/leo README) is one zip that
unpacks to `embeddings/<dataset>/<crop>/<split>_embeddings.pkl`. `install`
puts `<dataset>/<crop>/...` under a destination directory (the runner's
`--data_path`) in three stages, each of which can fail without leaving
anything half-done where the runner reads:

1. Download (stdlib `urllib` only) into `<dest>/.download/embeddings.zip.part`.
   An interrupted transfer keeps the `.part`; a rerun asks for the rest with
   an HTTP `Range` request (206), or starts over if the server ignores Range
   (200). A finished transfer is renamed to `<dest>/.download/embeddings.zip`.
2. Verify: sha256 (when given), every member's CRC (`ZipFile.testzip`), and the
   layout: every member must be `embeddings/<dataset>/<crop>/<split>_embeddings.pkl`
   (or one of its directories); absolute paths, `..`, backslashes and symlinks
   (zip-slip) are refused before a single byte is written.
3. Unpack into a staging directory under `<dest>/.download/`, then move each
   complete `<dataset>/<crop>` directory into place with
   `fileio.replace_directory` (rename-based: at every instant the old or the
   new complete directory exists; other crops and files are left alone).

Only the stdlib is used here, so the command-line wrapper starts fast.
"""

import contextlib
import fcntl
import http.client
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib

from leo_suite import __version__
from leo_suite import errors
from leo_suite import fileio

DEFAULT_URL = "http://storage.googleapis.com/leo-embeddings/embeddings.zip"
ARCHIVE_NAME = "embeddings.zip"
DOWNLOAD_DIR = ".download"
PART_SUFFIX = ".part"
ARCHIVE_ROOT = "embeddings"
SPLITS = ("train", "val", "test")
# (dataset, crop) pairs of the release; multiview exists for miniImageNet only.
EXPECTED_CROPS = (("miniImageNet", "center"), ("miniImageNet", "multiview"),
                  ("tieredImageNet", "center"))
# Operating-system litter that some zip tools add; never extracted.
_IGNORED_MEMBER = re.compile(r"^(__MACOSX/.*|(.*/)?\.DS_Store)$")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*$")
_CHUNK_BYTES = 1 << 20
_MB = 1e6
OFFLINE_HINT = ("download embeddings.zip on a machine with network access "
                "(e.g. `wget {url}`), copy it over and run: "
                "scripts/download_embeddings.py --archive path/to/embeddings.zip")


class DownloadError(errors.UserError):
  """The archive could not be fetched (network, HTTP status, disk)."""


def download_dir(dest):
  return os.path.join(os.path.abspath(dest), DOWNLOAD_DIR)


def part_path(dest):
  return os.path.join(download_dir(dest), ARCHIVE_NAME + PART_SUFFIX)


def check_sha256(digest):
  """Returns the digest in lower case; `ConfigError` unless 64 hex digits."""
  if digest is None:
    return None
  if not _SHA256.match(digest.strip()):
    raise errors.ConfigError(
        f"--sha256 {digest!r} is not a sha256 digest: expected 64 hexadecimal "
        "characters (as printed by `sha256sum embeddings.zip`)")
  return digest.strip().lower()


# ----------------------------------------------------------------------------
# Stage 1: resumable download.


class _Progress:
  """One progress line: bytes done / total, percent, MB/s of this session."""

  def __init__(self, stream, total, offset):
    self._stream = stream
    self._total = total
    self._offset = offset
    self._start = self._last = time.monotonic()
    self._tty = bool(getattr(stream, "isatty", lambda: False)())
    self._interval = 0.25 if self._tty else 10.0

  def _line(self, done):
    elapsed = max(time.monotonic() - self._start, 1e-6)
    speed = (done - self._offset) / elapsed / _MB
    if self._total:
      return (f"{done:,} / {self._total:,} bytes "
              f"({100.0 * done / self._total:.1f}%), {speed:.2f} MB/s")
    return f"{done:,} bytes, {speed:.2f} MB/s"

  def update(self, done):
    now = time.monotonic()
    if now - self._last < self._interval:
      return
    self._last = now
    self._write(self._line(done), final=False)

  def finish(self, done):
    self._write(self._line(done), final=True)

  def _write(self, text, final):
    if self._stream is None:
      return
    if self._tty:
      self._stream.write("\r" + text.ljust(60) + ("\n" if final else ""))
    else:
      self._stream.write(text + "\n")
    self._stream.flush()


def _parse_content_range(value):
  """`bytes a-b/total` -> (a, b, total); `bytes */total` -> (None, None, total)."""
  match = _CONTENT_RANGE.match(value or "")
  if not match:
    return None
  start, end, total = match.groups()
  as_int = lambda text: None if text in (None, "*") else int(text)
  return as_int(start), as_int(end), as_int(total)


def _size(path):
  return os.path.getsize(path) if os.path.exists(path) else 0


def _describe(exc):
  """A short one-line reason for a network exception."""
  if isinstance(exc, urllib.error.HTTPError):
    return f"HTTP {exc.code} {exc.reason}"
  if isinstance(exc, urllib.error.URLError):
    reason = exc.reason
    if isinstance(reason, (TimeoutError, socket.timeout)):
      return "timed out"
    return str(getattr(reason, "strerror", None) or reason)
  if isinstance(exc, (TimeoutError, socket.timeout)):
    return "timed out"
  if isinstance(exc, http.client.IncompleteRead):
    return "the connection closed before the transfer was complete"
  text = str(exc) or type(exc).__name__
  return " ".join(text.split())


def _require_free_space(directory, needed, what):
  free = shutil.disk_usage(directory).free
  if needed > free:
    raise DownloadError(
        f"not enough disk space in {directory} for {what}: need "
        f"{needed / _MB:,.1f} MB, {free / _MB:,.1f} MB free; free some space "
        "or pass another --dest")


def fetch(url, part, *, timeout=60.0, stream=sys.stderr, chunk_bytes=_CHUNK_BYTES):
  """Downloads `url` into the file `part`, resuming from its current size.

  Sends `Range: bytes=<size>-` when `part` is non-empty: a 206 answer is
  appended, a 200 (server ignores Range) restarts from byte 0, a 416 whose
  total equals the size means `part` is already complete.

  Returns:
    The number of bytes in `part` once it holds the whole resource.
  Raises:
    DownloadError: with a short reason; what was received stays in `part`.
  """
  headers = {"Accept-Encoding": "identity",
             "User-Agent": f"leo-suite/{__version__} (python-urllib)"}
  for _ in range(3):  # at most: a resume, a restart after a bad range, a retry
    offset = _size(part)
    request_headers = dict(headers)
    if offset:
      request_headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=request_headers)
    try:
      response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
      with contextlib.closing(exc):
        content_range = _parse_content_range(exc.headers.get("Content-Range"))
      if exc.code == 416 and offset:
        if content_range and content_range[2] == offset:
          return offset  # the previous run received everything
        _write_note(stream, f"the server refused to resume at byte {offset:,}; "
                    "restarting from byte 0")
        open(part, "wb").close()
        continue
      raise DownloadError(_describe(exc)) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException,
            ValueError) as exc:
      raise DownloadError(_describe(exc)) from None

    with response:
      status = response.status
      if status == 206:
        content_range = _parse_content_range(response.headers.get("Content-Range"))
        if not content_range or content_range[0] != offset:
          _write_note(stream, "the server sent a different range than asked "
                      f"({response.headers.get('Content-Range')!r}); restarting "
                      "from byte 0")
          open(part, "wb").close()
          continue
        total, mode = content_range[2], "ab"
      elif status == 200:
        if offset:
          _write_note(stream, f"the server ignored the Range request; discarding "
                      f"the {offset:,} bytes of {part} and restarting from byte 0")
        offset, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
      else:
        raise DownloadError(f"unexpected HTTP status {status} {response.reason}")
      if total is not None:
        _require_free_space(os.path.dirname(part), total - offset, "the download")
      _write_note(stream, (f"resuming at byte {offset:,}" if offset else
                           "downloading") + f" from {url}")
      progress = _Progress(stream, total, offset)
      done = offset
      try:
        with open(part, mode) as handle:
          while True:
            block = response.read(chunk_bytes)
            if not block:
              break
            handle.write(block)
            done += len(block)
            progress.update(done)
          handle.flush()
          os.fsync(handle.fileno())
      except (OSError, http.client.HTTPException, ValueError) as exc:
        progress.finish(_size(part))
        raise DownloadError(_describe(exc)) from None
      progress.finish(done)
      if total is not None and done != total:
        raise DownloadError(
            f"the connection closed after {done:,} of {total:,} bytes")
      return done
  raise DownloadError("the server kept answering the Range request inconsistently")


def _write_note(stream, text):
  if stream is not None:
    stream.write(text + "\n")
    stream.flush()


# ----------------------------------------------------------------------------
# Stage 2: verification.


def _is_symlink(info):
  return stat.S_ISLNK(info.external_attr >> 16)


def _check_member_path(archive, name):
  """Refuses a member whose path could escape the destination (zip-slip)."""
  parts = name.split("/")
  if (name.startswith("/") or "\\" in name or "\x00" in name or
      re.match(r"^[A-Za-z]:", name) or ".." in parts):
    raise errors.DataError(
        f"{archive}: member {name!r} has an absolute path or '..' and would be "
        "written outside the destination (zip-slip); refusing to unpack this "
        "archive: it is not the LEO release, get the original "
        f"from {DEFAULT_URL}")


def _layout_error(archive, name, why):
  expected = ", ".join(f"{d}/{c}" for d, c in EXPECTED_CROPS)
  return errors.DataError(
      f"{archive}: member {name!r} {why}; the LEO release holds only "
      f"{ARCHIVE_ROOT}/<dataset>/<crop>/<split>_embeddings.pkl with <dataset>/<crop> "
      f"in {{{expected}}} and <split> in {{{', '.join(SPLITS)}}}; refusing to "
      "unpack it")


def _classify_member(archive, info):
  """Returns (dataset, crop, split) for a split file, None for a directory."""
  name = info.filename
  parts = name.rstrip("/").split("/") if info.is_dir() else name.split("/")
  if any(p in ("", ".") for p in parts):
    raise _layout_error(archive, name, "has an empty or '.' path component")
  if parts[0] != ARCHIVE_ROOT:
    raise _layout_error(archive, name, f"is not under {ARCHIVE_ROOT}/")
  if not info.is_dir() and len(parts) != 4:
    raise _layout_error(archive, name, "is a file outside <dataset>/<crop>/")
  datasets = {d for d, _ in EXPECTED_CROPS}
  if len(parts) >= 2 and parts[1] not in datasets:
    raise _layout_error(archive, name, f"names an unknown dataset {parts[1]!r}")
  if len(parts) >= 3 and (parts[1], parts[2]) not in EXPECTED_CROPS:
    raise _layout_error(archive, name, f"names an unknown crop {parts[2]!r} "
                        f"for {parts[1]}")
  if info.is_dir():
    if len(parts) > 3:
      raise _layout_error(archive, name, "is a directory below <crop>/")
    return None
  split = parts[3][:-len("_embeddings.pkl")] if parts[3].endswith(
      "_embeddings.pkl") else None
  if split not in SPLITS:
    raise _layout_error(archive, name, "is not a <split>_embeddings.pkl file")
  return parts[1], parts[2], split


_ZIP_READ_ERRORS = (zipfile.BadZipFile, zlib.error, OSError, EOFError,
                    NotImplementedError, ValueError)


def _first_unreadable_member(zip_file):
  """(name, reason) of the first member that cannot be read back intact.

  `ZipFile.testzip` reports a CRC mismatch by name but lets decompression
  errors escape without one; this rereads the members to name the culprit.
  """
  for info in zip_file.infolist():
    try:
      with zip_file.open(info) as member:
        while member.read(_CHUNK_BYTES):
          pass
    except _ZIP_READ_ERRORS as exc:
      return info.filename, _describe(exc)
  return None, None


def verify_archive(archive, sha256=None, stream=sys.stderr):
  """Checks `archive` before anything is unpacked.

  Returns:
    {(dataset, crop): {split: member name}} for the pairs it holds.
  Raises:
    DataError: wrong sha256, not a zip, a CRC error, zip-slip, symlink, a
      member outside the layout, a duplicate member, or a (dataset, crop)
      without all of train/val/test.
  """
  sha256 = check_sha256(sha256)
  if sha256 is not None:
    _write_note(stream, f"checking the sha256 of {archive}")
    actual = fileio.file_sha256(archive)
    if actual != sha256:
      raise errors.DataError(
          f"{archive}: sha256 is {actual}, expected {sha256}; the file is "
          "corrupt or not the expected release")
  try:
    zip_file = zipfile.ZipFile(archive)
  except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
    raise errors.DataError(
        f"{archive}: not a readable zip archive ({_describe(exc)}); the file "
        "is truncated or corrupt") from None
  with zip_file:
    infos = zip_file.infolist()
    for info in infos:  # security first: no member may escape, whatever else
      _check_member_path(archive, info.filename)
      if _is_symlink(info):
        raise errors.DataError(
            f"{archive}: member {info.filename!r} is a symbolic link; refusing "
            "to unpack an archive with links (they can point outside the "
            "destination)")
    layout, seen = {}, set()
    for info in infos:
      if info.filename in seen:
        raise errors.DataError(
            f"{archive}: member {info.filename!r} appears twice; refusing an "
            "ambiguous archive")
      seen.add(info.filename)
      if _IGNORED_MEMBER.match(info.filename):
        continue
      split_file = _classify_member(archive, info)
      if split_file is not None:
        dataset, crop, split = split_file
        layout.setdefault((dataset, crop), {})[split] = info.filename
    if not layout:
      raise errors.DataError(
          f"{archive}: no {ARCHIVE_ROOT}/<dataset>/<crop>/<split>_embeddings.pkl "
          "member at all; this is not the LEO embeddings release")
    for (dataset, crop), splits in sorted(layout.items()):
      missing = [s for s in SPLITS if s not in splits]
      if missing:
        raise errors.DataError(
            f"{archive}: {dataset}/{crop} has no "
            f"{', '.join(s + '_embeddings.pkl' for s in missing)}; the archive "
            "is incomplete, get the full release")
    _write_note(stream, f"testing the CRC of the {len(infos)} members of {archive}")
    try:
      bad_member = zip_file.testzip()
    except _ZIP_READ_ERRORS as exc:  # e.g. a broken deflate stream
      bad_member, reason = _first_unreadable_member(zip_file)
      raise errors.DataError(
          f"{archive}: member {bad_member!r} is corrupt ({reason or _describe(exc)}); "
          "the archive is corrupt, get a fresh copy") from None
    if bad_member is not None:
      raise errors.DataError(
          f"{archive}: member {bad_member!r} fails its CRC check; the archive is "
          "corrupt, get a fresh copy")
  absent = [f"{d}/{c}" for d, c in EXPECTED_CROPS if (d, c) not in layout]
  if absent:
    _write_note(stream, f"note: the archive has no {', '.join(absent)}")
  return layout


# ----------------------------------------------------------------------------
# Stage 3: atomic unpacking.


def _extract_file(zip_file, name, target):
  """Streams one member to `target` (new file), CRC-checked and fsync'ed."""
  os.makedirs(os.path.dirname(target), exist_ok=True)
  with zip_file.open(name) as source, open(target, "xb") as sink:
    shutil.copyfileobj(source, sink, _CHUNK_BYTES)  # raises on a CRC mismatch
    sink.flush()
    os.fsync(sink.fileno())


def unpack(archive, dest, layout, stream=sys.stderr):
  """Extracts the split files of `layout` and moves them into `dest`.

  Everything is first written under `<dest>/.download/unpack-*`; only complete
  `<dataset>/<crop>` directories (all three splits) are renamed to
  `<dest>/<dataset>/<crop>`, replacing an older copy of that crop only, so the
  runner never sees a partial file and crops the archive lacks are kept.
  """
  dest = os.path.abspath(dest)
  staging_parent = download_dir(dest)
  os.makedirs(staging_parent, exist_ok=True)
  with zipfile.ZipFile(archive) as zip_file:
    needed = sum(zip_file.getinfo(name).file_size
                 for splits in layout.values() for name in splits.values())
    _require_free_space(staging_parent, needed, "unpacking")
    staging = tempfile.mkdtemp(prefix="unpack-", dir=staging_parent)
    try:
      for (dataset, crop), splits in sorted(layout.items()):
        for split in SPLITS:
          target = fileio.join_under(staging, dataset, crop,
                                     split + "_embeddings.pkl")
          _write_note(stream, f"unpacking {splits[split]}")
          try:
            _extract_file(zip_file, splits[split], target)
          except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise errors.DataError(
                f"{archive}: member {splits[split]!r} is corrupt "
                f"({_describe(exc)}); get a fresh copy") from None
      for dataset, crop in sorted(layout):
        final = fileio.join_under(dest, dataset, crop)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        fileio.recover_directory(final)
        fileio.replace_directory(os.path.join(staging, dataset, crop), final)
        _write_note(stream, f"installed {final}")
    finally:
      shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------
# The whole job.


@contextlib.contextmanager
def _exclusive(directory):
  """Holds an advisory lock on `directory` so two runs never share a .part."""
  fd = os.open(directory, os.O_RDONLY)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise errors.UserError(
          f"another download_embeddings run is using {directory}; wait for it "
          "to finish") from None
    yield
  finally:
    os.close(fd)


def _missing_ancestors(directory):
  """`directory` and its parents that do not exist yet, outermost first."""
  missing = []
  while directory and not os.path.exists(directory):
    missing.append(directory)
    parent = os.path.dirname(directory)
    if parent == directory:
      break
    directory = parent
  return missing[::-1]


def _remove_if_empty(directory):
  with contextlib.suppress(OSError):
    os.rmdir(directory)


def _remove_stale_staging(directory):
  for name in os.listdir(directory):
    if name.startswith("unpack-"):
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def clean(dest, stream=sys.stderr):
  """Removes `<dest>/.download` (a resumable .part, a downloaded archive)."""
  directory = download_dir(dest)
  if not os.path.isdir(directory):
    _write_note(stream, f"nothing to clean: {directory} does not exist")
    return
  with _exclusive(directory):
    shutil.rmtree(directory)
  _write_note(stream, f"removed {directory}")


def install(dest, url=DEFAULT_URL, sha256=None, archive=None, timeout=60.0,
            keep_archive=False, stream=sys.stderr):
  """Downloads (or takes `archive`), verifies and unpacks the embeddings.

  Args:
    dest: the directory that receives `<dataset>/<crop>/<split>_embeddings.pkl`.
    url: where to download from (ignored when `archive` is given).
    sha256: the expected hex digest of the zip, or None to skip that check.
    archive: a local copy of the zip; it is verified and unpacked, never
      modified or removed.
    timeout: seconds for connecting and for each read.
    keep_archive: keep `<dest>/.download/embeddings.zip` after unpacking.
    stream: where progress and notes go (None: silent).

  Returns:
    The layout that was installed: {(dataset, crop): {split: member}}.
  Raises:
    DownloadError / DataError / ConfigError: one-line, user-facing.
  """
  sha256 = check_sha256(sha256)
  if archive is not None:
    archive = os.path.abspath(archive)
    if not os.path.isfile(archive):
      raise errors.DataError(
          f"--archive {archive}: no such file; pass the path of a downloaded "
          "embeddings.zip")
  if timeout is not None and not timeout > 0:
    raise errors.ConfigError(f"--timeout {timeout} must be a positive number of seconds")
  dest = os.path.abspath(dest)
  if os.path.exists(dest) and not os.path.isdir(dest):
    raise errors.ConfigError(f"--dest {dest} exists and is not a directory")
  created = _missing_ancestors(download_dir(dest))
  try:
    os.makedirs(download_dir(dest), exist_ok=True)
  except OSError as exc:
    raise errors.ConfigError(f"--dest {dest}: cannot create it ({_describe(exc)})") from None
  try:
    with _exclusive(download_dir(dest)):
      _remove_stale_staging(download_dir(dest))
      downloaded = archive is None
      if downloaded:
        archive = _download_archive(dest, url, timeout, stream)
      try:
        layout = verify_archive(archive, sha256, stream)
      except errors.DataError as exc:
        if downloaded:
          os.remove(archive)
          raise errors.DataError(
              f"{exc} (downloaded from {url}; the bad archive was removed, "
              "rerun to download it again)") from None
        raise
      if sha256 is None:
        _write_note(stream, f"sha256 {fileio.file_sha256(archive)} (pass it as --sha256 "
                    "to check future downloads)")
      try:
        unpack(archive, dest, layout, stream)
      except OSError as exc:
        raise errors.DataError(
            f"unpacking {archive} into {dest} failed ({_describe(exc)}); "
            "nothing was changed there, fix the cause and rerun") from None
      if downloaded and not keep_archive:
        os.remove(archive)
      return layout
  finally:
    for directory in [download_dir(dest)] + created[::-1]:
      _remove_if_empty(directory)


def _download_archive(dest, url, timeout, stream):
  """Returns `<dest>/.download/embeddings.zip`, downloading it if needed."""
  complete = os.path.join(download_dir(dest), ARCHIVE_NAME)
  if os.path.isfile(complete):
    _write_note(stream, f"using the already downloaded {complete}")
    return complete
  part = complete + PART_SUFFIX
  try:
    fetch(url, part, timeout=timeout, stream=stream)
  except DownloadError as exc:
    kept = _size(part)
    if kept:
      state = (f"the {kept:,} bytes received are kept in {part}: rerun to resume, "
               "or pass --clean to remove them")
    else:
      with contextlib.suppress(OSError):
        os.remove(part)
      state = "nothing was written"
    raise DownloadError(
        f"could not download {url}: {exc} ({state}). Check the network and "
        f"rerun, or {OFFLINE_HINT.format(url=url)}") from None
  os.replace(part, complete)
  return complete
