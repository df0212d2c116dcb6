"""Image decoding with clear errors: the one path from image bytes to pixels.

`decode_encoded` is the TensorFlow function extraction, pretraining and
exported models all run on image bytes; `decode_image` checks a file with PIL
first (corrupt, mode, size: errors name the file) and `Decoder` decodes
`image_sources.ImageRecord`s in order, raising on a bad one or skipping and
reporting it.
"""

import dataclasses
import io
import warnings
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
import tensorflow as tf

from leo_suite import errors
from leo_suite import safe_decode
from leo_suite import safeio
from leo_suite.data.image_sources import close_archives
from leo_suite.data.image_sources import ImageRecord

# Modes the decoder converts to grayscale / RGB without surprises.
DEFAULT_MODES = ("1", "L", "P", "RGB", "RGBA", "LA", "I;16", "I")


# -- decoding -------------------------------------------------------------------
# Formats TensorFlow decodes, and the PIL modes it reads right (None = all):
# their bytes reach `decode_encoded` unchanged, as a served model receives them.
_TF_FORMATS = {"PNG": None, "GIF": None, "WEBP": None, "JPEG": ("L", "RGB"),
               "BMP": ("RGB", "RGBA")}
_PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA")


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  """How images become arrays [image_size, image_size, channels] uint8."""
  image_size: int
  channels: int = 1
  expected_size: Optional[Tuple[int, int]] = None  # (width, height), None = any
  allowed_modes: Tuple[str, ...] = DEFAULT_MODES
  skip_bad: bool = False
  tool_flags: bool = True   # errors advise --skip_bad_images / --allowed_modes (extraction's)


def _luma(rgb):
  """uint8 [H, W, 3] -> [H, W, 1]: ITU-R 601-2 in integers, exactly PIL's "L"."""
  x = tf.cast(rgb, tf.int32)
  y = x[..., 0:1] * 19595 + x[..., 1:2] * 38470 + x[..., 2:3] * 7471 + 32768
  return tf.cast(tf.bitwise.right_shift(y, 16), tf.uint8)


_HEADER_BYTES = 32   # enough for the size fields of PNG, GIF and BMP headers


def _header_number(header, start: int, size: int, big_endian: bool):
  """The unsigned integer of bytes header[start:start + size] (int64)."""
  digits = header[start:start + size]
  digits = digits[::-1] if big_endian else digits
  return tf.reduce_sum(digits * tf.constant([256**i for i in range(size)], tf.int64))


def encoded_size(encoded):
  """(width, height) int64 that an encoded image's header claims, without decoding.

  JPEG: `tf.io.extract_jpeg_shape`; PNG: the IHDR's big-endian width and height
  (bytes 16-24); GIF: the logical screen (bytes 6-10); BMP: the DIB header
  (bytes 18-26). Other formats (WebP) and short headers give (0, 0).
  """
  encoded = tf.convert_to_tensor(encoded, tf.string)
  head = tf.strings.substr(encoded, 0, _HEADER_BYTES)
  padded = tf.strings.substr(tf.strings.join([head, b"\0" * _HEADER_BYTES]), 0, _HEADER_BYTES)
  header = tf.cast(tf.io.decode_raw(padded, tf.uint8), tf.int64)

  def starts(magic: bytes):
    return tf.reduce_all(tf.equal(header[:len(magic)], list(magic)))

  def other_formats():
    png = starts(b"\x89PNG\r\n\x1a\n")
    gif = starts(b"GIF8")
    bmp = starts(b"BM")
    signed = _header_number(header, 22, 4, False)   # a top-down BMP's height is negative
    sizes = [(png, _header_number(header, 16, 4, True), _header_number(header, 20, 4, True)),
             (gif, _header_number(header, 6, 2, False), _header_number(header, 8, 2, False)),
             (bmp, _header_number(header, 18, 4, False),
              tf.where(signed >= 2**31, 2**32 - signed, signed))]
    width = height = tf.constant(0, tf.int64)
    for found, w, h in sizes:
      width, height = tf.where(found, w, width), tf.where(found, h, height)
    return width, height

  def jpeg():
    shape = tf.cast(tf.io.extract_jpeg_shape(encoded), tf.int64)
    return shape[1], shape[0]
  return tf.cond(tf.io.is_jpeg(encoded), jpeg, other_formats)


def check_encoded_pixels(encoded, max_pixels: int):
  """An assert op: width * height from the header <= `max_pixels` (else InvalidArgumentError).

  The cap of `safe_decode`'s checks ($LEO_SUITE_MAX_IMAGE_PIXELS), checked in
  the graph before decoding, so a served model refuses a decompression bomb.
  """
  width, height = encoded_size(encoded)
  pixels = width * height
  return tf.debugging.Assert(pixels <= max_pixels, [tf.strings.format(
      "image of {}x{} = {} pixels, more than the cap of " + f"{max_pixels:,}" +
      " pixels; refused before decoding (send a smaller image; the cap is "
      f"{safeio.MAX_IMAGE_PIXELS_ENV} of the export)", [width, height, pixels])])


def decode_encoded(encoded, image_size: int, channels: int, max_pixels: Optional[int] = None):
  """Encoded image (scalar string) -> uint8 [image_size, image_size, channels].

  The one preprocessing of pixels: extraction, pretraining and exported
  models all call it. JPEG is decoded with the accurate integer DCT (as PIL
  does), a GIF's first frame is used and 16-bit samples keep their high byte;
  alpha is dropped; colour becomes grey with `_luma`, grey becomes colour by
  repetition; an image not already S x S is stretched to S x S with
  antialiased Lanczos-3 (`tf.image.resize`), rounded and clipped. TensorFlow
  ops only (it runs inside SavedModels); undecodable bytes raise
  InvalidArgumentError. With `max_pixels`, the header's width x height is
  checked first (`check_encoded_pixels`).
  """
  encoded = tf.convert_to_tensor(encoded, tf.string)
  if max_pixels is not None:
    with tf.control_dependencies([check_encoded_pixels(encoded, max_pixels)]):
      encoded = tf.identity(encoded)
  image = tf.cond(
      tf.io.is_jpeg(encoded),
      lambda: tf.io.decode_jpeg(encoded, channels=0, dct_method="INTEGER_ACCURATE"),
      lambda: tf.io.decode_image(encoded, channels=0, dtype=tf.uint8,
                                 expand_animations=False))
  colour = tf.shape(image)[-1] >= 3
  if channels == 1:
    image = tf.cond(colour, lambda: _luma(image[..., :3]), lambda: image[..., :1])
  else:
    image = tf.cond(colour, lambda: image[..., :3],
                    lambda: tf.tile(image[..., :1], [1, 1, channels]))
  image.set_shape([None, None, channels])

  def resize():
    resized = tf.image.resize(image, [image_size, image_size], method="lanczos3",
                              antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)

  same = tf.reduce_all(tf.equal(tf.shape(image)[:2], image_size))
  image = tf.cond(same, lambda: image, resize)
  return tf.reshape(image, [image_size, image_size, channels])


_decode_encoded = tf.function(decode_encoded, autograph=False)


def _corrupt(shown, exc, options: DecodeOptions):
  """The DataError for an image that cannot be decoded (`shown`: its printable name)."""
  advice = ("replace it, or pass --skip_bad_images to skip and report it"
            if options.tool_flags else "replace or remove it")
  return errors.DataError(f"{shown}: unreadable or corrupt image "
                          f"({safeio.exception_text(exc, shown)}); {advice}")


def _open_checked(payload: bytes, shown: str, options: DecodeOptions):
  """The PIL image, fully read; DataError if corrupt, too large, or of another mode/size.

  Its width x height is checked from the header before any pixel is decoded
  (safe_decode.check_image_header: at most $LEO_SUITE_MAX_IMAGE_PIXELS).
  """
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # the cap decides
      image = Image.open(io.BytesIO(payload))   # the header only
  except Image.DecompressionBombError:
    image = None   # refused just below, naming the cap
  except (OSError, SyntaxError, ValueError) as exc:
    raise _corrupt(shown, exc, options) from None
  safe_decode.check_image_header(payload, shown)
  try:
    image.load()
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
    raise _corrupt(shown, exc, options) from None
  if image.mode not in options.allowed_modes:
    raise errors.DataError(
        f"{shown}: unexpected image mode {image.mode!r}; allowed modes are "
        f"{list(options.allowed_modes)} (convert the image"
        f"{' or pass --allowed_modes' if options.tool_flags else ''})")
  if options.expected_size and tuple(image.size) != tuple(options.expected_size):
    raise errors.DataError(
        f"{shown}: image is {image.size[0]}x{image.size[1]}, expected "
        f"{options.expected_size[0]}x{options.expected_size[1]} (pass "
        "--expected_size=any to accept and resize every size)")
  return image


def _as_png(image) -> bytes:
  """Lossless PNG of a PIL image; 16/32-bit integers keep bits 8-15 (grey)."""
  if image.mode.startswith("I"):
    high = np.asarray(image).astype(np.int64) >> 8
    image = Image.fromarray(np.clip(high, 0, 255).astype(np.uint8))
  elif image.mode not in _PNG_MODES:
    image = image.convert("RGB")
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()


def decode_image(payload: bytes, origin: str, options: DecodeOptions) -> np.ndarray:
  """PIL checks (corrupt, mode, size), then `decode_encoded`; raises DataError.

  The bytes go to `decode_encoded` unchanged when TensorFlow reads their
  format (PNG, JPEG, GIF, WebP, 24/32-bit BMP), so an exported model sent
  the same file sees the same pixels. Other files (TIFF, PPM/PGM, palette
  or 16-bit BMP, CMYK JPEG, ...) are first converted to PNG by PIL.
  """
  shown = safeio.display_name(origin, 400)   # printable whatever the name's bytes
  image = _open_checked(payload, shown, options)
  modes = _TF_FORMATS.get(image.format, ())

  def decode(encoded):   # a tensor, not bytes: one trace per size, not per image
    return _decode_encoded(tf.constant(encoded), options.image_size,
                           options.channels).numpy()
  try:
    if modes is None or image.mode in modes:
      try:
        return decode(payload)
      except tf.errors.InvalidArgumentError:
        pass  # a variant TensorFlow does not read: as PNG below
    return decode(_as_png(image))
  except (tf.errors.InvalidArgumentError, OSError, ValueError) as exc:
    raise _corrupt(shown, exc, options) from None


class Decoder:
  """Decodes records in order; bad ones raise, or are skipped and reported."""

  def __init__(self, options: DecodeOptions):
    self.options = options
    self.skipped: List[Tuple[str, str]] = []  # (origin, reason)

  def iterate(self, records: Sequence[ImageRecord]):
    """Yields (index, uint8 array) for every decodable record."""
    cache = {}
    try:
      for index, record in enumerate(records):
        try:
          array = decode_image(record.read_bytes(cache), record.origin, self.options)
        except errors.DataError as exc:
          if not self.options.skip_bad:
            raise
          self.skipped.append((record.origin, str(exc)))
          continue
        yield index, array
    finally:
      close_archives(cache)


def load_arrays(records: Sequence[ImageRecord], options: DecodeOptions):
  """Decodes everything into memory: (uint8 [n, S, S, C], kept indices, skipped)."""
  decoder = Decoder(options)
  kept, arrays = [], []
  for index, array in decoder.iterate(records):
    kept.append(index)
    arrays.append(array)
  if not arrays:
    raise errors.DataError(
        f"none of the {len(records)} images could be decoded (first: "
        f"{records[0].origin if records else '-'})")
  return np.stack(arrays), np.asarray(kept, np.int64), decoder.skipped


def parse_expected_size(text: Optional[str]):
  """'105x105' -> (105, 105); '' / 'any' -> None."""
  if not text or text == "any":
    return None
  try:
    width, height = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise errors.ConfigError(
        f"--expected_size={text!r}: use WIDTHxHEIGHT (e.g. 105x105) or 'any'") from None
  return (width, height)
