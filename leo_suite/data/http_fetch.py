"""Resumable HTTP download of one file (stdlib `urllib` only).

`fetch` downloads into a `.part` file: an interrupted transfer keeps it, and a
rerun asks for the rest with an HTTP `Range` request (206), or starts over if
the server ignores Range (200). Errors are `DownloadError`s with a one-line
reason (`describe_error`).
"""

import contextlib
import http.client
import os
import re
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request

from leo_suite import __version__
from leo_suite import errors

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*$")
CHUNK_BYTES = 1 << 20
_MB = 1e6


class DownloadError(errors.UserError):
  """The archive could not be fetched (network, HTTP status, disk)."""


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


def file_size(path):
  return os.path.getsize(path) if os.path.exists(path) else 0


def describe_error(exc):
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


def require_free_space(directory, needed, what):
  free = shutil.disk_usage(directory).free
  if needed > free:
    raise DownloadError(
        f"not enough disk space in {directory} for {what}: need "
        f"{needed / _MB:,.1f} MB, {free / _MB:,.1f} MB free; free some space "
        "or pass another --dest")


def fetch(url, part, *, timeout=60.0, stream=sys.stderr, chunk_bytes=CHUNK_BYTES):
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
    offset = file_size(part)
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
        write_note(stream, f"the server refused to resume at byte {offset:,}; "
                   "restarting from byte 0")
        open(part, "wb").close()
        continue
      raise DownloadError(describe_error(exc)) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException,
            ValueError) as exc:
      raise DownloadError(describe_error(exc)) from None

    with response:
      status = response.status
      if status == 206:
        content_range = _parse_content_range(response.headers.get("Content-Range"))
        if not content_range or content_range[0] != offset:
          write_note(stream, "the server sent a different range than asked "
                     f"({response.headers.get('Content-Range')!r}); restarting "
                     "from byte 0")
          open(part, "wb").close()
          continue
        total, mode = content_range[2], "ab"
      elif status == 200:
        if offset:
          write_note(stream, f"the server ignored the Range request; discarding "
                     f"the {offset:,} bytes of {part} and restarting from byte 0")
        offset, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
      else:
        raise DownloadError(f"unexpected HTTP status {status} {response.reason}")
      if total is not None:
        require_free_space(os.path.dirname(part), total - offset, "the download")
      write_note(stream, (f"resuming at byte {offset:,}" if offset else
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
        progress.finish(file_size(part))
        raise DownloadError(describe_error(exc)) from None
      progress.finish(done)
      if total is not None and done != total:
        raise DownloadError(
            f"the connection closed after {done:,} of {total:,} bytes")
      return done
  raise DownloadError("the server kept answering the Range request inconsistently")


def write_note(stream, text):
  if stream is not None:
    stream.write(text + "\n")
    stream.flush()
