"""One writer per run directory: its `.lock` file (layout.LOCK_FILE)."""

import contextlib
import datetime
import json
import os
import socket
import sys
import time

from leo_suite import errors
from leo_suite.training import layout
from leo_suite.training import settings


class RunLock:
  """One writer per run directory: `<run>/.lock` holds the holder's pid and host.

  Taken (O_CREAT | O_EXCL) before anything else is written; a second command
  on the same directory is refused naming the holder. A lock whose process is
  gone (same host, dead pid) is stale: it is taken over, with a log line.
  Released on exit; a directory this lock created is removed again if nothing
  else was written into it (a command that failed leaves no trace).
  """

  def __init__(self, directory: str, log=None, create: bool = True):
    self.directory = directory
    self.create = create
    self.path = layout.RunDirectory(directory).lock_path
    self.log = log or (lambda message: None)
    self._created_dir = False
    self._held = False

  def __enter__(self):
    if os.path.lexists(self.directory) and not os.path.isdir(self.directory):
      raise errors.ConfigError(
          f"--checkpoint_path={self.directory} is a file, not a run directory; choose a "
          "directory (a new one for a new run)")
    if not os.path.isdir(self.directory):
      if not self.create:
        raise errors.UserError(
            f"{self.directory}: no such run directory (pass the --checkpoint_path of a "
            "`python runner.py` training run)")
      os.makedirs(self.directory)
      self._created_dir = True
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec="seconds"),
              "command": " ".join(os.path.basename(a) if i == 0 else a
                                  for i, a in enumerate(sys.argv))[:300]}
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        other = self._read_holder()
        if other is not None and not self._is_stale(other):
          self._cleanup_dir()
          raise errors.ConfigError(
              f"{self.directory} is in use by process {other.get('pid')} on "
              f"{other.get('host')} (since {other.get('started')}: "
              f"{settings.shorten(other.get('command', ''), 120)}); wait for it to finish or use "
              f"another --checkpoint_path. If that process is gone, delete {self.path}")
        self.log(f"{self.path}: taking over a stale lock of process "
                 f"{(other or {}).get('pid')} on {(other or {}).get('host')}, which is gone")
        with contextlib.suppress(FileNotFoundError):
          os.remove(self.path)
        continue
      with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(holder))
      self._held = True
      return self
    raise errors.ConfigError(f"{self.path}: could not take the run's lock; retry")

  def _read_holder(self):
    try:
      with open(self.path) as handle:
        return json.loads(handle.read(4096))
    except FileNotFoundError:
      return {}  # released meanwhile: retry
    except (OSError, ValueError):
      return None if time_since_modified(self.path) < 5 else {}  # being written

  @staticmethod
  def _is_stale(holder) -> bool:
    if not holder:
      return True
    if holder.get("host") != socket.gethostname():
      return False  # cannot tell: another machine may be running it
    try:
      os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
      return True
    except (PermissionError, ValueError, TypeError, OverflowError):
      return False
    return False

  def _cleanup_dir(self):
    if self._created_dir:
      with contextlib.suppress(OSError):
        os.rmdir(self.directory)

  def __exit__(self, *exc_info):
    if self._held:
      with contextlib.suppress(OSError):
        os.remove(self.path)
      self._held = False
    self._cleanup_dir()
    return False


def time_since_modified(path) -> float:
  try:
    return time.time() - os.stat(path).st_mtime
  except OSError:
    return float("inf")
