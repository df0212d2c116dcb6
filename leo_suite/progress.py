"""Progress lines for long loops (`what: done/total <unit>, rate, ETA`) and the
process's peak memory."""

import resource
import time
from typing import Callable, Optional

from absl import logging


class Progress:
  """Logs `what: done/total <unit>, rate, ETA` at most every `interval_s` seconds
  (and at the end), through `log(message)`."""

  def __init__(self, what: str, total: Optional[int], unit: str = "tasks",
               interval_s: float = 10.0, log: Callable[..., None] = logging.info):
    self.what, self.total, self.unit, self.interval_s, self.log = (
        what, total, unit, interval_s, log)
    self.start = self.last = time.time()
    self.done = 0

  def update(self, count: int):
    self.done += count
    now = time.time()
    if now - self.last < self.interval_s and (not self.total or self.done < self.total):
      return
    self.last = now
    rate = self.done / max(now - self.start, 1e-9)
    eta = (f", ETA {format_seconds((self.total - self.done) / max(rate, 1e-9))}"
           if self.total else "")
    of = f"/{self.total}" if self.total else ""
    self.log(f"{self.what}: {self.done}{of} {self.unit}, {rate:.1f} {self.unit}/s{eta}")


def format_seconds(seconds):
  seconds = int(seconds)
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def peak_rss_mib() -> float:
  """This process's resident-memory high-water mark (MiB): Linux's VmHWM, which
  /proc/self/clear_refs can reset (getrusage's ru_maxrss is kept across fork
  and exec); elsewhere ru_maxrss (KiB on Linux)."""
  try:
    with open("/proc/self/status") as handle:
      for line in handle:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
