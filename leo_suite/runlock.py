"""One writer per run directory, held by an OS file lock for the process's life.

`<run>/.lock` is opened (created if missing, never truncated on open) and
locked with `flock(LOCK_EX | LOCK_NB)`; only the process holding that lock
writes its pid, host, start time and command into the file, which the
refusal message of every other process quotes. The kernel drops the lock
when its holder exits, however it exits, so a stale lock (holder killed) is
taken over atomically by whoever locks next, and a garbage lock file is simply
overwritten by the process that holds the lock.

Under any interleaving at most one process holds the run:
  * the directory is created race-free (`os.mkdir`; "created by me" is that
    call's success, remembered by inode);
  * after locking, the locked file must still be the one at `<run>/.lock`
    (same device and inode), else the lock was taken on a file that has
    since been removed and the attempt is repeated;
  * on release the holder removes `.lock` while still holding it (checking
    it is still its own file), then the directory if it created it and it is
    empty (`os.rmdir` fails on anything non-empty, so a directory another
    process has locked meanwhile, which holds that process's `.lock`, is never
    removed), and only then unlocks. A process that opened the old file
    before it was removed finds, after locking it, that it is no longer
    `<run>/.lock` and retries; one whose directory vanished recreates it.

A lock file naming a holder on another host is respected (refused), as
before: whether `flock` reaches across machines depends on the file system.
A process that forks keeps the lock held by its children too (flock locks
belong to the open file, which a fork shares); `O_CLOEXEC` keeps exec'd
programs from inheriting it.
"""

import contextlib
import datetime
import errno
import json
import os
import socket
import stat
import sys
import time

from leo_suite import errors

try:
  import fcntl  # pylint: disable=g-import-not-at-top
except ImportError:  # not a POSIX system
  fcntl = None

LOCK_FILE = ".lock"
_ATTEMPTS = 100  # directory removed / lock file replaced between steps: retry
_HOLDER_BYTES = 4096
_DETAILS_WAIT = 1.0  # seconds a refused process waits for the holder's details


def _no_pause(point: str) -> None:
  del point


# Test hook: called with "directory" (after the run directory is made, before
# the lock file is opened), "opened" (before flock), "locked" (before the
# holder's details are written) and "release" (before the lock file is
# removed), so tests can widen each race window. Never set outside tests.
_pause = _no_pause


def shorten(value, limit=200):
  """repr(value), cut to `limit` characters."""
  text = repr(value)
  return text if len(text) <= limit else text[:limit] + "...'"


def holder_details() -> dict:
  """What this process writes into a lock it holds."""
  return {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "command": " ".join(os.path.basename(a) if i == 0 else a
                              for i, a in enumerate(sys.argv))[:300]}


def _parse(raw: bytes):
  """The holder dict in a lock file's bytes, or None if they are not one."""
  try:
    holder = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, ValueError):
    return None
  return holder if isinstance(holder, dict) and "pid" in holder else None


def _pid_is_gone(holder) -> bool:
  """True if `holder` ran on this host and its process no longer exists."""
  if holder.get("host") != socket.gethostname():
    return False
  try:
    os.kill(int(holder.get("pid", -1)), 0)
  except ProcessLookupError:
    return True
  except (PermissionError, ValueError, TypeError, OverflowError):
    return False
  return False


class RunLock:
  """One writer per run directory: `<run>/.lock`, flock'ed, names its holder.

  Taken before anything else is written; a second command on the same
  directory is refused naming the holder. A lock whose holder is gone is taken
  over, with a log line. Released on exit; a directory this lock created is
  removed again if nothing else was written into it (a command that failed
  leaves no trace). `create=False` (evaluation) refuses a missing directory.
  """

  def __init__(self, directory: str, log=None, create: bool = True):
    self.directory = directory
    self.create = create
    self.path = os.path.join(directory, LOCK_FILE)
    self.log = log or (lambda message: None)
    self._created = None  # (st_dev, st_ino) of the directory this lock made
    self._fd = None

  @property
  def held(self) -> bool:
    return self._fd is not None

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc_info):
    self.release()
    return False

  def acquire(self):
    """Takes the lock or raises errors.ConfigError / UserError naming why."""
    if fcntl is None:
      raise errors.ConfigError(
          f"{self.directory}: cannot lock the run directory: this platform has no "
          "fcntl.flock (run leo-suite on Linux or macOS)")
    if self._fd is not None:
      raise errors.ConfigError(f"{self.path}: this lock is already held by this process")
    for _ in range(_ATTEMPTS):
      self._ensure_directory()
      _pause("directory")
      fd = self._open()
      if fd is None:
        continue  # the directory was removed meanwhile
      try:
        _pause("opened")
        try:
          fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, InterruptedError):
          holder = self._busy_holder(fd)
          os.close(fd)
          fd = None
          self._cleanup_dir()
          raise errors.ConfigError(self._in_use_message(holder)) from None
        if not self._still_the_lock_file(fd):
          continue  # removed (released) between open and flock: retry on the new one
        previous = _parse(os.pread(fd, _HOLDER_BYTES, 0))
        if previous is not None and previous.get("host") != socket.gethostname():
          os.close(fd)
          fd = None
          self._cleanup_dir()
          raise errors.ConfigError(self._in_use_message(previous))
        self._log_takeover(fd, previous)
        _pause("locked")
        data = json.dumps(holder_details()).encode("utf-8")
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        self._fd, fd = fd, None
        return self
      finally:
        if fd is not None:
          os.close(fd)
    self._cleanup_dir()
    raise errors.ConfigError(f"{self.path}: could not take the run's lock; retry")

  def release(self):
    """Removes the lock file (still held) and a directory this lock made, then unlocks."""
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      _pause("release")
      if self._still_the_lock_file(fd):
        try:
          os.remove(self.path)
        except OSError:  # cannot remove it: left empty, harmless (the next holder overwrites it)
          with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
      self._cleanup_dir()
    finally:
      os.close(fd)

  def _ensure_directory(self):
    if os.path.lexists(self.directory) and not os.path.isdir(self.directory):
      raise errors.ConfigError(
          f"--checkpoint_path={self.directory} is a file, not a run directory; choose a "
          "directory (a new one for a new run)")
    if os.path.isdir(self.directory):
      return
    if not self.create:
      raise errors.UserError(
          f"{self.directory}: no such run directory (pass the --checkpoint_path of a "
          "`python runner.py` training run)")
    parent = os.path.dirname(os.path.abspath(self.directory))
    os.makedirs(parent, exist_ok=True)
    try:
      os.mkdir(self.directory)
    except FileExistsError:
      self._ensure_directory()  # made by another process meanwhile (or a file: refused)
      return
    info = os.stat(self.directory)
    self._created = (info.st_dev, info.st_ino)

  def _open(self):
    """The lock file's descriptor (created if missing), or None if the directory vanished."""
    flags = (os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK |
             getattr(os, "O_CLOEXEC", 0))
    try:
      fd = os.open(self.path, flags, 0o644)
    except FileNotFoundError:
      return None
    except OSError as exc:
      if exc.errno == errno.ELOOP:
        raise errors.ConfigError(
            f"{self.path} is a symbolic link; remove it (the run's lock is a plain file)"
        ) from None
      if exc.errno in (errno.ENXIO, errno.EISDIR):
        raise errors.ConfigError(
            f"{self.path} is not a regular file; remove it (the run's lock is a plain "
            "file)") from None
      raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO opened without blocking
      os.close(fd)
      raise errors.ConfigError(
          f"{self.path} is not a regular file; remove it (the run's lock is a plain file)")
    return fd

  def _still_the_lock_file(self, fd) -> bool:
    try:
      current = os.stat(self.path, follow_symlinks=False)
    except OSError:
      return False
    mine = os.fstat(fd)
    return (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino)

  def _busy_holder(self, fd):
    """The locked file's holder, waiting briefly while the holder writes it."""
    deadline = time.monotonic() + _DETAILS_WAIT
    while True:
      holder = _parse(os.pread(fd, _HOLDER_BYTES, 0))
      if holder is not None and not _pid_is_gone(holder):
        return holder
      if time.monotonic() > deadline:
        return None  # the file still holds an old holder's or no details
      time.sleep(0.02)

  def _in_use_message(self, holder) -> str:
    advice = "wait for it to finish or use another --checkpoint_path"
    if holder is None:
      return (f"{self.directory} is in use by another process (it has not written its "
              f"details into {self.path} yet); {advice}")
    return (f"{self.directory} is in use by process {holder.get('pid')} on "
            f"{holder.get('host')} (since {holder.get('started')}: "
            f"{shorten(holder.get('command', ''), 120)}); {advice}. If that process is gone, "
            f"delete {self.path}")

  def _log_takeover(self, fd, previous):
    if previous is not None:
      why = "which is gone" if _pid_is_gone(previous) else "which no longer holds it"
      self.log(f"{self.path}: taking over a stale lock of process {previous.get('pid')} on "
               f"{previous.get('host')}, {why}")
    elif os.fstat(fd).st_size:
      self.log(f"{self.path}: replacing an unreadable lock file (no process holds it)")

  def _cleanup_dir(self):
    """Removes the directory this lock made if it is still that one and empty."""
    if self._created is None:
      return
    try:
      info = os.stat(self.directory, follow_symlinks=False)
      if (info.st_dev, info.st_ino) == self._created:
        os.rmdir(self.directory)  # fails (kept) unless empty
    except OSError:
      pass
    self._created = None
