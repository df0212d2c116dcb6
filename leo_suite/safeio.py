"""Input safety: names, sizes and file kinds that come from outside are checked.

Every reader of user data goes through this layer:
  * a name read from a file or a flag (split, dataset, class folder) is one
    path component (`check_name`), and a path built from such names stays in
    its root (`child_path`);
  * a file is opened without blocking and read only if it is a regular file
    no larger than a cap, checked before anything is read (`open_regular`,
    `read_bytes`): a FIFO does not hang, a link to /dev/zero is not read;
  * what decompresses (image pixels, zip and npz members) is checked before
    it is decompressed: leo_suite/safe_decode.py, on the same messages and caps.
Refusals raise `errors.DataError` (or the caller's `error` class, e.g.
`errors.ConfigError` for a flag) with one line of at most `MAX_MESSAGE`
characters that names the file as printable text whatever its bytes.
"""

import errno
import io
import os
import re
import stat

from leo_suite import errors

MAX_FILE_BYTES = 4 * 2**30  # default cap on one file read whole (as the arrays' cap)
MAX_FILE_BYTES_ENV = "LEO_SUITE_MAX_FILE_BYTES"
MAX_ARRAY_BYTES_ENV = "LEO_SUITE_MAX_ARRAY_BYTES"  # the embeddings loader's cap, honoured too
MAX_IMAGE_PIXELS = 4096 * 4096  # default cap on width * height, checked before decoding
MAX_IMAGE_PIXELS_ENV = "LEO_SUITE_MAX_IMAGE_PIXELS"
MAX_ZIP_RATIO = 256  # uncompressed : compressed, as the embeddings loader's expansion limit
MAX_ZIP_RATIO_ENV = "LEO_SUITE_MAX_ZIP_RATIO"
RATIO_MIN_BYTES = 2**20  # smaller members may compress any amount
MAX_NAME_BYTES = 255  # one path component, as NAME_MAX
MAX_MESSAGE = 500  # characters in one refusal
MAX_DISPLAY = 200  # characters of a name or value quoted in a message
CHUNK_BYTES = 2**20
_SEPARATORS = ("/", "\\")
_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"))
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_OBJECT_REPR = re.compile(r"<_?[\w.]+ object at 0x[0-9a-fA-F]+>")


def one_line(text, limit: int = MAX_MESSAGE, say_cut: bool = False) -> str:
  """`text` as one line of at most `limit` characters (`say_cut`: the first
  `limit`, then how many more were cut)."""
  text = " ".join(str(text).split())
  if len(text) <= limit:
    return text
  if say_cut:
    return f"{text[:limit]}... ({len(text) - limit:,} more characters)"
  return text[:limit - 3] + "..."


def refuse(error, text):
  return error(one_line(text))


def listed(items, limit: int = 5) -> str:
  """The first `limit` of `items` quoted, then '... and N more' (never thousands)."""
  items = list(items)
  shown = ", ".join(quoted(item, 80) for item in items[:limit])
  return shown + (f" ... and {len(items) - limit:,} more" if len(items) > limit else "")


def exception_text(exc, source=None, limit: int = MAX_DISPLAY) -> str:
  """`exc` as one short line, a file object's repr (`<_io.BytesIO object at 0x...>`)
  replaced by `source`'s name: messages name files, not Python objects."""
  name = display_name(source, 80) if source is not None else "the data"
  text = _OBJECT_REPR.sub(lambda _: name, str(exc))
  return one_line(f"{type(exc).__name__}: {text}" if text else type(exc).__name__, limit)


def display_name(value, limit: int = MAX_DISPLAY) -> str:
  """A file name or value printable whatever its bytes: escapes, <= `limit` chars.

  Bytes are decoded as UTF-8 with invalid bytes shown as `\\xNN`; a str from
  the file system keeps its undecodable bytes as surrogates, shown the same
  way; control and other non-printable characters are escaped.
  """
  if isinstance(value, os.PathLike):
    value = os.fspath(value)
  if isinstance(value, (bytes, bytearray)):
    value = bytes(value).decode("utf-8", "surrogateescape")
  elif not isinstance(value, str):
    value = repr(value)
  out, size = [], 0
  for char in value:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte kept by surrogateescape
      piece = f"\\x{code - 0xDC00:02x}"
    elif char in _ESCAPES:
      piece = _ESCAPES[char]
    elif char.isprintable():
      piece = char
    else:
      piece = f"\\x{code:02x}" if code < 0x100 else (
          f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    size += len(piece)
    if size > limit:
      return "".join(out) + "..."
    out.append(piece)
  return "".join(out)


def quoted(value, limit: int = MAX_DISPLAY) -> str:
  """`display_name(value)` in single quotes, for a message."""
  return f"'{display_name(value, limit)}'"


def env_cap(env: str, default: int, override=None) -> int:
  """A positive integer cap: `override`, else $`env`, else `default`."""
  source, value = ((None, override) if override is not None else
                   (env, os.environ.get(env) or None))
  if value is None:
    return default
  try:
    cap = int(value)
  except (TypeError, ValueError):
    cap = 0
  if cap <= 0:
    where = f"{source}=" if source else "a cap of "
    raise errors.ConfigError(one_line(
        f"{where}{display_name(str(value), 60)}: expected a positive whole number "
        f"(default {default})"))
  return cap


def max_file_bytes(override=None) -> int:
  """`override`, else $LEO_SUITE_MAX_FILE_BYTES, else $LEO_SUITE_MAX_ARRAY_BYTES, else 4 GiB."""
  if override is None and not os.environ.get(MAX_FILE_BYTES_ENV):
    return env_cap(MAX_ARRAY_BYTES_ENV, MAX_FILE_BYTES)
  return env_cap(MAX_FILE_BYTES_ENV, MAX_FILE_BYTES, override)


def max_image_pixels(override=None) -> int:
  """`override`, else $LEO_SUITE_MAX_IMAGE_PIXELS, else 4096 * 4096."""
  return env_cap(MAX_IMAGE_PIXELS_ENV, MAX_IMAGE_PIXELS, override)


def max_zip_ratio(override=None) -> int:
  """`override`, else $LEO_SUITE_MAX_ZIP_RATIO, else 256."""
  return env_cap(MAX_ZIP_RATIO_ENV, MAX_ZIP_RATIO, override)


# ------------------------------------------------------------------ names


def check_name(name, what: str, error=errors.DataError) -> str:
  """`name` if it is one safe path component, else `error` naming `what`.

  A component is non-empty, not '.' or '..', has no '/' or '\\', no NUL or
  other control character, is valid UTF-8 and at most 255 bytes long: a split,
  dataset or class name read from a file or flag never leaves its folder.
  """
  if isinstance(name, (bytes, bytearray)):
    try:
      name = bytes(name).decode("utf-8")
    except UnicodeDecodeError:
      raise refuse(error, f"{what} {quoted(name)}: not valid UTF-8; rename it") from None
  if not isinstance(name, str):
    raise refuse(error, f"{what}: expected a name, got {type(name).__name__} "
                         f"{display_name(name)}")
  why = None
  if not name:
    why = "is empty"
  elif name in (".", ".."):
    why = "is not a name (it names a folder itself)"
  elif "\0" in name:
    why = "contains a NUL character"
  elif os.path.isabs(name) or any(sep in name for sep in _SEPARATORS):
    why = "must be a single name, without '/' or '\\' (no absolute or nested paths)"
  elif any(0xDC80 <= ord(c) <= 0xDCFF for c in name):
    why = "is not valid UTF-8; rename it"
  elif any(not c.isprintable() for c in name):
    why = "contains control characters; rename it"
  elif len(name.encode("utf-8")) > MAX_NAME_BYTES:
    why = f"is longer than {MAX_NAME_BYTES} bytes"
  if why:
    raise refuse(error, f"{what} {quoted(name)} {why}")
  return name


def child_path(root, *names, what: str = "name", error=errors.DataError) -> str:
  """`root` joined with checked `names`, refused if it resolves outside `root`.

  Symbolic links are resolved (realpath) on both sides, so a link inside
  `root` that points elsewhere is refused too. Returns the joined (unresolved)
  path.
  """
  for name in names:
    check_name(name, what, error)
  path = os.path.join(root, *names)
  real_root = os.path.realpath(root)
  real = os.path.realpath(path)
  if os.path.commonpath([real_root, real]) != real_root:
    raise refuse(error, f"{what} {quoted(os.path.join(*names))} in "
                         f"{display_name(root)}: resolves to {display_name(real)}, outside "
                         "that folder (a symbolic link?); refused")
  return path


# ------------------------------------------------------------------ files


def _kind(mode) -> str:
  for test, kind in _KINDS:
    if test(mode):
      return kind
  return "not a regular file"


def _too_big_text(shown, size, cap, env):
  return (f"{shown}: {size:,} bytes, more than the cap of {cap:,} bytes; refused before "
          f"reading (if the file is genuine, set {env} higher)")


def open_regular(path, max_bytes=None, what: str = None, error=errors.DataError):
  """`path` opened for binary reading if it is a regular file <= `max_bytes`.

  Opened with O_NONBLOCK (a FIFO does not hang), then fstat'ed: a symbolic
  link is followed and its target checked; a FIFO, device, socket or
  directory is refused, and so is a size above the cap (default
  `max_file_bytes()`), all before any byte is read. A missing or unreadable
  file is refused as `error` too. The returned (buffered, seekable) file
  refuses to return bytes past the cap if the file grows meanwhile. The
  caller closes it.
  """
  cap = max_file_bytes(max_bytes)
  shown = what or display_name(path)
  flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
  try:
    fd = os.open(path, flags)
  except FileNotFoundError:
    raise refuse(error, f"{shown}: no such file") from None
  except NotADirectoryError:
    raise refuse(error, f"{shown}: no such file (a part of its path is not a folder)") from None
  except PermissionError:
    raise refuse(error, f"{shown}: no permission to read it") from None
  except OSError as exc:
    if exc.errno in (errno.ENXIO, errno.ELOOP):  # a socket; a loop of links
      raise refuse(error, f"{shown}: {exc.strerror}; not a regular file") from None
    raise
  try:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
      raise refuse(error, f"{shown}: is {_kind(info.st_mode)}, not a regular file; refused")
    if info.st_size > cap:
      env = MAX_FILE_BYTES_ENV
      raise refuse(error, _too_big_text(shown, info.st_size, cap, env))
    try:
      import fcntl  # pylint: disable=g-import-not-at-top
      fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except ImportError:
      pass
    raw = _CappedFile(fd, cap, shown, error)
  except BaseException:
    os.close(fd)
    raise
  raw.name = os.fspath(path)
  return io.BufferedReader(raw)


def _over_cap_text(what, cap):
  return (f"{what}: holds more than the cap of {cap:,} bytes (it grew while being read, or "
          f"lied about its size); set {MAX_FILE_BYTES_ENV} higher if it is genuine")


class _CappedFile(io.FileIO):
  """A file that refuses to return any byte past position `cap` (a file that grows)."""

  def __init__(self, fd, cap, what, error):
    super().__init__(fd, "rb", closefd=True)
    self._cap, self._what, self._error = cap, what, error

  def _check(self, start, count):
    if count and start + count > self._cap:
      raise refuse(self._error, _over_cap_text(self._what, self._cap))

  def readinto(self, buffer):
    start = self.tell()
    count = super().readinto(buffer)
    self._check(start, count or 0)
    return count

  def read(self, size=-1):
    if size is None or size < 0:
      return self.readall()
    start = self.tell()
    data = super().read(size)
    self._check(start, len(data or b""))
    return data

  def readall(self):
    chunks = []
    while True:
      chunk = self.read(CHUNK_BYTES)
      if not chunk:
        return b"".join(chunks)
      chunks.append(chunk)


def read_capped(handle, max_bytes: int, what: str, error=errors.DataError) -> bytes:
  """At most `max_bytes` bytes of an open file, read in chunks; more is refused."""
  chunks, total = [], 0
  while True:
    chunk = handle.read(min(CHUNK_BYTES, max_bytes + 1 - total))
    if not chunk:
      return b"".join(chunks)
    total += len(chunk)
    if total > max_bytes:
      raise refuse(error, _over_cap_text(what, max_bytes))
    chunks.append(chunk)


def read_bytes(path, max_bytes=None, what: str = None, error=errors.DataError) -> bytes:
  """The whole of regular file `path` (see `open_regular`), never more than the cap."""
  cap = max_file_bytes(max_bytes)
  shown = what or display_name(path)
  with open_regular(path, cap, shown, error) as handle:
    return read_capped(handle, cap, shown, error)
