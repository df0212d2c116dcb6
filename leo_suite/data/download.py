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
import os
import shutil
import sys

from leo_suite import errors
from leo_suite import fileio
from leo_suite.data.http_fetch import describe_error
from leo_suite.data.http_fetch import DownloadError
from leo_suite.data.http_fetch import fetch
from leo_suite.data.http_fetch import file_size
from leo_suite.data.http_fetch import write_note
from leo_suite.data.release_archive import ARCHIVE_NAME
from leo_suite.data.release_archive import check_sha256
from leo_suite.data.release_archive import DEFAULT_URL
from leo_suite.data.release_archive import download_dir
from leo_suite.data.release_archive import PART_SUFFIX
from leo_suite.data.release_archive import unpack
from leo_suite.data.release_archive import verify_archive

OFFLINE_HINT = ("download embeddings.zip on a machine with network access "
                "(e.g. `wget {url}`), copy it over and run: "
                "scripts/download_embeddings.py --archive path/to/embeddings.zip")


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
    write_note(stream, f"nothing to clean: {directory} does not exist")
    return
  with _exclusive(directory):
    shutil.rmtree(directory)
  write_note(stream, f"removed {directory}")


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
    raise errors.ConfigError(f"--dest {dest}: cannot create it ({describe_error(exc)})") from None
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
        write_note(stream, f"sha256 {fileio.file_sha256(archive)} (pass it as --sha256 "
                   "to check future downloads)")
      try:
        unpack(archive, dest, layout, stream)
      except OSError as exc:
        raise errors.DataError(
            f"unpacking {archive} into {dest} failed ({describe_error(exc)}); "
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
    write_note(stream, f"using the already downloaded {complete}")
    return complete
  part = complete + PART_SUFFIX
  try:
    fetch(url, part, timeout=timeout, stream=stream)
  except DownloadError as exc:
    kept = file_size(part)
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
