"""Crash-safe file writing, path sanitising and file hashes.

Every file the suite writes goes through `atomic_write`: the bytes land in a
temporary file in the same directory, are fsync'ed, and are renamed over the
destination. A killed process therefore leaves either the old file or the new
one, never half of one (a stray `*.tmp-*` file at worst, which no reader opens).
"""

import contextlib
import hashlib
import os
import re
import shutil
import sys
import tempfile

from leo_suite import errors
from leo_suite import safeio

_TMP_MARK = ".tmp-"


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
  """Opens a temporary file that replaces `path` only if the block succeeds."""
  directory = os.path.dirname(os.path.abspath(path)) or "."
  os.makedirs(directory, exist_ok=True)
  fd, tmp_path = tempfile.mkstemp(
      prefix=os.path.basename(path) + _TMP_MARK, dir=directory)
  try:
    os.chmod(tmp_path, 0o666 & ~_umask())
    with os.fdopen(fd, mode) as handle:
      yield handle
      handle.flush()
      os.fsync(handle.fileno())
    os.replace(tmp_path, path)
    _fsync_dir(directory)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp_path)
    raise


def atomic_write_bytes(path, payload):
  with atomic_write(path, "wb") as handle:
    handle.write(payload)


def atomic_write_text(path, text):
  atomic_write_bytes(path, text.encode("utf-8"))


def file_sha256(path) -> str:
  """The sha256 hex digest of regular file `path` (safeio.open_regular: a FIFO is
  refused, not waited on), read in 1 MiB blocks."""
  digest = hashlib.sha256()
  with safeio.open_regular(path, max_bytes=sys.maxsize) as handle:
    for block in iter(lambda: handle.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def replace_directory(staging_dir, final_dir):
  """Moves a fully written `staging_dir` to `final_dir`, replacing it.

  The old directory is first renamed aside, so at every instant either the old
  or the new complete directory exists (recover with `recover_directory`).
  """
  old_dir = final_dir + ".old"
  if os.path.exists(old_dir):
    shutil.rmtree(old_dir)
  if os.path.exists(final_dir):
    os.replace(final_dir, old_dir)
  os.replace(staging_dir, final_dir)
  _fsync_dir(os.path.dirname(os.path.abspath(final_dir)))
  if os.path.exists(old_dir):
    shutil.rmtree(old_dir)


def recover_directory(final_dir):
  """Undoes a `replace_directory` that was killed between its two renames."""
  old_dir = final_dir + ".old"
  if not os.path.exists(final_dir) and os.path.exists(old_dir):
    os.replace(old_dir, final_dir)
  elif os.path.exists(old_dir):
    shutil.rmtree(old_dir)


@contextlib.contextmanager
def new_generation(final_dir, carry=()):
  """Yields an empty staging folder `<final_dir>.tmp-<random>` that replaces `final_dir`.

  Written in full, the staging folder is switched in by `replace_directory`;
  the entries of the old folder named in `carry` (e.g. a shards folder) are
  moved over first. A failure or kill leaves the old folder as it was: the next
  call first undoes a switch killed between its renames (`recover_directory`)
  and removes staging folders of killed calls (their carried entries go back).
  """
  recover_directory(final_dir)
  parent = os.path.dirname(os.path.abspath(final_dir))
  base = os.path.basename(os.path.abspath(final_dir))
  for name in os.listdir(parent) if os.path.isdir(parent) else ():
    if name.startswith(base + _TMP_MARK) and os.path.isdir(os.path.join(parent, name)):
      _drop_staging(os.path.join(parent, name), final_dir, carry)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=base + _TMP_MARK, dir=parent)
  try:
    yield staging
    for name in carry:
      if os.path.lexists(os.path.join(final_dir, name)):
        os.replace(os.path.join(final_dir, name), os.path.join(staging, name))
    replace_directory(staging, final_dir)
  except BaseException:
    _drop_staging(staging, final_dir, carry)
    raise


def _drop_staging(staging, final_dir, carry):
  """Removes a staging folder, its carried entries first moved back to `final_dir`."""
  recover_directory(final_dir)
  for name in carry:
    moved, home = os.path.join(staging, name), os.path.join(final_dir, name)
    if os.path.lexists(moved) and not os.path.lexists(home):
      os.makedirs(final_dir, exist_ok=True)
      os.replace(moved, home)
  shutil.rmtree(staging, ignore_errors=True)


def _umask():
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _fsync_dir(directory):
  with contextlib.suppress(OSError):
    fd = os.open(directory, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


_UNSAFE = re.compile(r"[^A-Za-z0-9._()+=,@-]+")


def safe_component(name):
  """Turns a data-derived name (class, key) into one safe path component."""
  text = name.decode("latin1") if isinstance(name, bytes) else str(name)
  cleaned = _UNSAFE.sub("_", text).strip("._") or "_"
  return cleaned[:200]


def join_under(root, *parts):
  """Joins sanitised `parts` under `root`; refuses anything that escapes it."""
  root_abs = os.path.realpath(root)
  path = os.path.realpath(os.path.join(root_abs, *[safe_component(p) for p in parts]))
  if os.path.commonpath([root_abs, path]) != root_abs:
    raise errors.UserError(f"refusing to write outside {root_abs}: {path}")
  return path
