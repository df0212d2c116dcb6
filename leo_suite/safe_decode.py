"""Input safety for what decompresses: image pixels, zip and npz members.

  * an image's size in pixels is checked from its header before it is decoded
    (`open_image`, `check_image_header`);
  * a zip or npz member's declared size and compression ratio are checked
    before it is decompressed, and reading stops at the cap even if the header
    lied (`check_zip_members`, `read_zip_member`, `check_npz`).
Names, regular files, caps and messages: leo_suite/safeio.py.
"""

import io
import os
import warnings
import zipfile
import zlib

from leo_suite import errors
from leo_suite.safeio import (MAX_FILE_BYTES_ENV, MAX_IMAGE_PIXELS_ENV,
                              MAX_ZIP_RATIO_ENV, RATIO_MIN_BYTES, check_name, display_name,
                              exception_text, max_file_bytes, max_image_pixels, max_zip_ratio,
                              one_line,
                              open_regular, quoted, read_bytes, read_capped, refuse)

_ENCRYPTED = 0x1  # zip general-purpose flag bit

# ------------------------------------------------------------------ images


def open_image(data_or_file, what: str, max_pixels=None, error=errors.DataError):
  """A PIL image, opened from its header only, if width * height <= the cap.

  `data_or_file`: bytes, a path (read through `read_bytes`'s checks) or a
  binary file object. The pixels are decoded later by the caller (`.load()`,
  `.convert()`), so a huge image is refused before any memory is spent on it.
  PIL's own DecompressionBomb warning and error become `error` too.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  cap = max_image_pixels(max_pixels)
  if isinstance(data_or_file, (bytes, bytearray, memoryview)):
    source = io.BytesIO(data_or_file)
  elif isinstance(data_or_file, (str, os.PathLike)):
    source = io.BytesIO(read_bytes(data_or_file, None, what, error))
  else:
    source = data_or_file
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our cap decides
      image = Image.open(source)
  except Image.DecompressionBombError as exc:
    raise refuse(error, f"{what}: refused before decoding: {exc}") from None
  except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as exc:
    raise refuse(error, f"{what}: not an image PIL can read "
                         f"({exception_text(exc, what)})") from None
  width, height = image.size
  if width * height > cap:
    image.close()
    raise refuse(error, f"{what}: {width}x{height} = {width * height:,} pixels, more than the "
                         f"cap of {cap:,}; refused before decoding (if the image is genuine, "
                         f"set {MAX_IMAGE_PIXELS_ENV} higher)")
  return image


def check_image_header(data_or_file, what: str, max_pixels=None, error=errors.DataError):
  """(width, height) from the image's header, refused above the pixel cap (see open_image)."""
  image = open_image(data_or_file, what, max_pixels, error)
  try:
    return image.size
  finally:
    image.close()


# ------------------------------------------------------------------ zip and npz


def member_parts(info_or_name, what: str, error=errors.DataError) -> tuple:
  """A zip member's path as checked components ('a/b/c.png' -> ('a', 'b', 'c.png')).

  A trailing '/' (a folder entry) is dropped; an absolute path, '..', '.',
  an empty component or a backslash is refused (`check_name`), so names
  taken from an archive never leave the folder they are written to.
  """
  name = getattr(info_or_name, "filename", info_or_name)
  parts = name[:-1].split("/") if name.endswith("/") else name.split("/")
  where = f"{what}: member {quoted(name)}:"
  return tuple(check_name(part, f"{where} part", error) for part in parts)


def check_zip_member(info: zipfile.ZipInfo, what: str, max_member_bytes=None,
                     max_ratio=None, error=errors.DataError) -> int:
  """`info.file_size` if the member is not encrypted, nor too large, nor a bomb."""
  cap = max_file_bytes(max_member_bytes)
  ratio = max_zip_ratio(max_ratio)
  name = f"{what}: member {quoted(info.filename)}"
  if info.flag_bits & _ENCRYPTED:
    raise refuse(error, f"{name} is encrypted (password-protected); extract it or re-create "
                         "the archive without a password")
  if info.file_size > cap:
    raise refuse(error, f"{name} would take {info.file_size:,} bytes when decompressed, more "
                         f"than the cap of {cap:,} bytes; refused before decompressing (if it "
                         f"is genuine, set {MAX_FILE_BYTES_ENV} higher)")
  if info.file_size > RATIO_MIN_BYTES and info.file_size > ratio * max(info.compress_size, 1):
    raise refuse(error, f"{name} expands {info.compress_size:,} bytes to {info.file_size:,}, "
                         f"more than {ratio} times: a compression bomb; refused (if it is "
                         f"genuine, set {MAX_ZIP_RATIO_ENV} higher)")
  return info.file_size


def check_zip_members(zip_file: zipfile.ZipFile, what: str, max_member_bytes=None,
                      max_ratio=None, max_total_bytes=None, error=errors.DataError) -> int:
  """Every member checked (`check_zip_member`); returns their declared total size.

  `max_total_bytes`, if given, caps the sum of the members' declared sizes.
  """
  total = 0
  for info in zip_file.infolist():
    total += check_zip_member(info, what, max_member_bytes, max_ratio, error)
  if max_total_bytes is not None and total > max_total_bytes:
    raise refuse(error, f"{what}: its members would take {total:,} bytes when decompressed, "
                         f"more than the cap of {max_total_bytes:,} bytes; refused (if it is "
                         f"genuine, set {MAX_FILE_BYTES_ENV} higher)")
  return total


def read_zip_member(zip_file: zipfile.ZipFile, info, max_bytes=None, what: str = None,
                    error=errors.DataError) -> bytes:
  """A member's bytes (checked first), read in chunks that stop at the cap.

  `info`: a ZipInfo or a member name. A header that lies about the size, a
  corrupt or encrypted member, an unsupported compression all become `error`.
  """
  cap = max_file_bytes(max_bytes)
  shown = what or display_name(getattr(zip_file, "filename", None) or "zip archive")
  try:
    if not isinstance(info, zipfile.ZipInfo):
      info = zip_file.getinfo(info)
  except KeyError:
    raise refuse(error, f"{shown}: no member {quoted(info)}") from None
  check_zip_member(info, shown, cap, None, error)
  name = f"{shown}: member {quoted(info.filename)}"
  try:
    with zip_file.open(info) as handle:
      return read_capped(handle, cap, name, error)
  except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError,
          ValueError) as exc:
    raise refuse(error, f"{name}: cannot be read ({one_line(exc, 200)}); the archive is "
                         "corrupt or uses an unsupported feature") from None


def check_npz(path_or_zipfile, max_bytes=None, what: str = None, max_ratio=None,
              error=errors.DataError) -> int:
  """An npz's members checked before np.load decompresses them; their declared total.

  Each member's declared size and compression ratio is checked, and so is
  their sum against the cap (default `max_file_bytes()`). A path is opened
  through `open_regular`'s checks; a broken archive becomes `error`.
  """
  cap = max_file_bytes(max_bytes)
  if isinstance(path_or_zipfile, zipfile.ZipFile):
    shown = what or display_name(path_or_zipfile.filename or "npz archive")
    return check_zip_members(path_or_zipfile, shown, cap, max_ratio, cap, error)
  shown = what or display_name(path_or_zipfile)
  with open_regular(path_or_zipfile, cap, shown, error) as handle:
    try:
      with zipfile.ZipFile(handle) as zip_file:
        return check_zip_members(zip_file, shown, cap, max_ratio, cap, error)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, ValueError) as exc:
      raise refuse(error, f"{shown}: not a readable npz (zip) archive "
                           f"({one_line(exc, 200)})") from None
