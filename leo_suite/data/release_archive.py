"""The LEO embeddings release archive: its layout, verification and unpacking.

The release (`DEFAULT_URL`, see the deepmind/leo README) is one zip that
unpacks to `embeddings/<dataset>/<crop>/<split>_embeddings.pkl`.
`verify_archive` checks the sha256 (when given), every member's CRC and the
layout before a single byte is written; `unpack` moves each complete
`<dataset>/<crop>` directory into place atomically (`leo_suite.data.download`
runs the whole job).
"""

import contextlib
import os
import re
import shutil
import stat
import sys
import tempfile
import zipfile
import zlib

from leo_suite import errors
from leo_suite import fileio
from leo_suite import safe_decode
from leo_suite import safeio
from leo_suite.data.http_fetch import CHUNK_BYTES
from leo_suite.data.http_fetch import describe_error
from leo_suite.data.http_fetch import require_free_space
from leo_suite.data.http_fetch import write_note

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
        while member.read(CHUNK_BYTES):
          pass
    except _ZIP_READ_ERRORS as exc:
      return info.filename, describe_error(exc)
  return None, None


@contextlib.contextmanager
def open_zip(archive):
  """The ZipFile of `archive` if it is a regular file (safeio.open_regular), else DataError."""
  with safeio.open_regular(archive, max_bytes=sys.maxsize) as handle:
    try:
      zip_file = zipfile.ZipFile(handle)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
      raise errors.DataError(
          f"{safeio.display_name(archive)}: not a readable zip archive "
          f"({describe_error(exc)}); the file is truncated or corrupt") from None
    with zip_file:
      yield zip_file


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
    write_note(stream, f"checking the sha256 of {archive}")
    actual = fileio.file_sha256(archive)
    if actual != sha256:
      raise errors.DataError(
          f"{archive}: sha256 is {actual}, expected {sha256}; the file is "
          "corrupt or not the expected release")
  with open_zip(archive) as zip_file:
    infos = zip_file.infolist()
    for info in infos:  # security first: no member may escape, whatever else
      _check_member_path(archive, info.filename)
      if _is_symlink(info):
        raise errors.DataError(
            f"{archive}: member {info.filename!r} is a symbolic link; refusing "
            "to unpack an archive with links (they can point outside the "
            "destination)")
      safe_decode.member_parts(info, safeio.display_name(archive))   # names, then sizes
      safe_decode.check_zip_member(info, safeio.display_name(archive))
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
    write_note(stream, f"testing the CRC of the {len(infos)} members of {archive}")
    try:
      bad_member = zip_file.testzip()
    except _ZIP_READ_ERRORS as exc:  # e.g. a broken deflate stream
      bad_member, reason = _first_unreadable_member(zip_file)
      raise errors.DataError(
          f"{archive}: member {bad_member!r} is corrupt ({reason or describe_error(exc)}); "
          "the archive is corrupt, get a fresh copy") from None
    if bad_member is not None:
      raise errors.DataError(
          f"{archive}: member {bad_member!r} fails its CRC check; the archive is "
          "corrupt, get a fresh copy")
  absent = [f"{d}/{c}" for d, c in EXPECTED_CROPS if (d, c) not in layout]
  if absent:
    write_note(stream, f"note: the archive has no {', '.join(absent)}")
  return layout


# ----------------------------------------------------------------------------
# Stage 3: atomic unpacking.


def _extract_file(zip_file, name, target):
  """Streams one member to `target` (new file), CRC-checked and fsync'ed."""
  os.makedirs(os.path.dirname(target), exist_ok=True)
  with zip_file.open(name) as source, open(target, "xb") as sink:
    shutil.copyfileobj(source, sink, CHUNK_BYTES)  # raises on a CRC mismatch
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
  with open_zip(archive) as zip_file:
    needed = sum(zip_file.getinfo(name).file_size
                 for splits in layout.values() for name in splits.values())
    require_free_space(staging_parent, needed, "unpacking")
    staging = tempfile.mkdtemp(prefix="unpack-", dir=staging_parent)
    try:
      for (dataset, crop), splits in sorted(layout.items()):
        for split in SPLITS:
          target = fileio.join_under(staging, dataset, crop,
                                     split + "_embeddings.pkl")
          write_note(stream, f"unpacking {splits[split]}")
          try:
            _extract_file(zip_file, splits[split], target)
          except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise errors.DataError(
                f"{archive}: member {splits[split]!r} is corrupt "
                f"({describe_error(exc)}); get a fresh copy") from None
      for dataset, crop in sorted(layout):
        final = fileio.join_under(dest, dataset, crop)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        fileio.recover_directory(final)
        fileio.replace_directory(os.path.join(staging, dataset, crop), final)
        write_note(stream, f"installed {final}")
    finally:
      shutil.rmtree(staging, ignore_errors=True)
