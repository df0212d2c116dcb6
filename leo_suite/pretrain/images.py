"""Labelled image sources, class splits and image decoding with clear errors.

Sources (all yield `ImageRecord`s grouped by class name):
  * a class-per-folder tree of any depth, from a directory or read straight
    from one or more zip archives (no unpacking). A class is the image's
    folder path relative to the root, e.g. `Japanese_(katakana)/character01`
    for Omniglot's `<alphabet>/<character>/*.png`. A zip's single top-level
    folder (e.g. `images_background_small1/`) is not part of the class name.
    The same (class, file name) in several archives is one image if the bytes
    are identical (Omniglot's Greek and Latin are in both small archives) and
    an error if they differ.
  * a TFDS dataset by name (`tfds:<name>[:<split>]`), read with
    `download=False` unless asked; class names from its ClassLabel feature.
  * the miniImageNet split CSVs of Ravi & Larochelle: `<root>/{train,val,
    test}.csv` with a `filename,label` header and images in `<root>/images/`;
    the CSVs also give the class split.

Splits are lists of class names or class-path prefixes (an Omniglot alphabet
selects all its characters), from a JSON file or a named protocol
(`omniglot_small`); `assign_classes` checks that splits are disjoint, that
every entry selects something, and the expected per-split class counts.
"""

import csv
import dataclasses
import hashlib
import io
import json
import os
import posixpath
import zipfile
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
import tensorflow as tf

from leo_suite import errors

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif",
                    ".tiff", ".webp")
SPLIT_NAMES = ("train", "val", "test")
# Modes the decoder converts to grayscale / RGB without surprises.
DEFAULT_MODES = ("1", "L", "P", "RGB", "RGBA", "LA", "I;16", "I")
NAMED_PROTOCOLS = {"omniglot_small": "omniglot_small_split.json"}
OMNIGLOT_ENV = "LEO_SUITE_OMNIGLOT_DIR"


@dataclasses.dataclass(frozen=True)
class ImageRecord:
  """One labelled image and where its bytes are.

  `location` is ("file", path), ("zip", archive, member) or ("bytes", payload);
  `origin` names it in messages ("/a/b.png" or "x.zip:dir/b.png").
  """
  class_name: str
  file_name: str
  origin: str
  location: tuple

  def read_bytes(self, zip_cache=None) -> bytes:
    kind = self.location[0]
    try:
      if kind == "file":
        with open(self.location[1], "rb") as handle:
          return handle.read()
      if kind == "zip":
        cache = zip_cache if zip_cache is not None else {}
        archive = cache.get(self.location[1])
        if archive is None:
          archive = cache[self.location[1]] = zipfile.ZipFile(self.location[1])
        return archive.read(self.location[2])
      return self.location[1]
    except (OSError, zipfile.BadZipFile, KeyError) as exc:
      raise errors.DataError(f"{self.origin}: cannot read ({exc})") from None


def _is_image(name):
  return name.lower().endswith(IMAGE_EXTENSIONS)


# -- folder trees and zip archives --------------------------------------------
def scan_directory(root: str, unlabelled: bool = False) -> List[ImageRecord]:
  """Records of every image under `root`; class = folder path relative to root.

  An image directly under `root` is an error, or with `unlabelled` a record of
  class "" (no class).
  """
  if not os.path.isdir(root):
    raise errors.DataError(f"{root}: not a directory (expected a class-per-folder tree)")
  records = []
  for directory, subdirs, files in os.walk(root):
    subdirs.sort()
    relative = os.path.relpath(directory, root).replace(os.sep, "/")
    for name in sorted(files):
      if not _is_image(name):
        continue
      path = os.path.join(directory, name)
      if relative == "." and not unlabelled:
        raise errors.DataError(
            f"{path}: image directly under the root {root}; put each class's "
            "images in its own folder (<root>/<class>/.../<image>)")
      records.append(ImageRecord("" if relative == "." else relative, name, path,
                                 ("file", path)))
  if not records:
    raise errors.DataError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...) found")
  return records


def scan_zip(path: str, unlabelled: bool = False) -> List[ImageRecord]:
  """Records of every image inside zip `path`, read in place (not unpacked).

  With `unlabelled`, an image in no class folder is a record of class "".
  """
  try:
    with zipfile.ZipFile(path) as archive:
      members = [m for m in archive.namelist()
                 if not m.endswith("/") and _is_image(m)
                 and not posixpath.basename(m).startswith("._")
                 and not m.startswith("__MACOSX/")]
  except FileNotFoundError:
    raise errors.DataError(f"{path}: no such file") from None
  except (zipfile.BadZipFile, OSError) as exc:
    raise errors.DataError(f"{path}: not a readable zip archive ({exc})") from None
  if not members:
    raise errors.DataError(f"{path}: the archive holds no images")
  tops = {m.split("/", 1)[0] for m in members}
  # One top-level folder with no images directly inside: the archive's name.
  strip = (len(tops) == 1 and all(m.count("/") >= 2 for m in members))
  records = []
  for member in sorted(members):
    relative = member.split("/", 1)[1] if strip else member
    class_name = posixpath.dirname(relative)
    if not class_name and not unlabelled:
      raise errors.DataError(
          f"{path}:{member}: image outside any class folder; the archive must "
          "hold <class>/.../<image> (optionally under one top-level folder)")
    records.append(ImageRecord(class_name, posixpath.basename(member),
                               f"{path}:{member}", ("zip", path, member)))
  return records


def merge_records(groups: Sequence[List[ImageRecord]]) -> List[ImageRecord]:
  """Unions record lists; identical duplicates (same class, name, bytes) count once."""
  merged: Dict[Tuple[str, str], ImageRecord] = {}
  cache = {}
  for records in groups:
    for record in records:
      key = (record.class_name, record.file_name)
      previous = merged.get(key)
      if previous is None:
        merged[key] = record
        continue
      a = hashlib.sha256(previous.read_bytes(cache)).hexdigest()
      b = hashlib.sha256(record.read_bytes(cache)).hexdigest()
      if a != b:
        raise errors.DataError(
            f"{record.origin} and {previous.origin} are both image "
            f"{record.file_name!r} of class {record.class_name!r} but differ; "
            "remove one of the sources or rename the file")
  _close(cache)
  return [merged[key] for key in sorted(merged)]


def _close(cache):
  for archive in cache.values():
    archive.close()
  cache.clear()


# -- miniImageNet CSVs ----------------------------------------------------------
def scan_csv_splits(root: str):
  """Ravi & Larochelle CSVs: returns (records, {split: [classes]})."""
  records, splits, owner = [], {}, {}
  for split in SPLIT_NAMES:
    csv_path = os.path.join(root, f"{split}.csv")
    if not os.path.exists(csv_path):
      raise errors.DataError(
          f"{csv_path}: no such file; a miniImageNet root needs train.csv, "
          "val.csv and test.csv (filename,label) next to images/")
    with open(csv_path, newline="") as handle:
      rows = list(csv.reader(handle))
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
      raise errors.DataError(
          f"{csv_path}: the first line must be the header 'filename,label' "
          f"(found {rows[0] if rows else 'an empty file'})")
    missing = []
    classes = []
    for line, row in enumerate(rows[1:], start=2):
      if len(row) != 2 or not row[0].strip() or not row[1].strip():
        raise errors.DataError(f"{csv_path}:{line}: expected 'filename,label', got {row}")
      file_name, label = row[0].strip(), row[1].strip()
      if owner.setdefault(label, split) != split:
        raise errors.DataError(
            f"{csv_path}:{line}: class {label!r} is also in {owner[label]}.csv; "
            "train/val/test classes must not overlap")
      if label not in classes:
        classes.append(label)
      path = os.path.join(root, "images", file_name)
      if not os.path.exists(path):
        missing.append(path)
      records.append(ImageRecord(label, file_name, path, ("file", path)))
    if missing:
      raise errors.DataError(
          f"{csv_path}: {len(missing)} listed image(s) are missing, first "
          f"{missing[0]}; images must be in {os.path.join(root, 'images')}")
    if not classes:
      raise errors.DataError(f"{csv_path}: lists no images")
    splits[split] = classes
  return records, splits


# -- TFDS -----------------------------------------------------------------------
def scan_tfds(name: str, split: str = "train", data_dir: Optional[str] = None,
              image_key: str = "image", label_key: str = "label",
              download: bool = False) -> List[ImageRecord]:
  """Records of a TFDS split (encoded image bytes kept, decoded later)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  try:
    dataset, info = tfds.load(
        name, split=split, data_dir=data_dir, download=download, with_info=True,
        decoders={image_key: tfds.decode.SkipDecoding()})
  except Exception as exc:  # tfds raises many types for missing/unknown data
    raise errors.DataError(
        f"TFDS dataset {name!r} split {split!r}: cannot load ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0] if str(exc) else ''}); build it with "
        "download=True where there is network access, or pass --tfds_data_dir") from None
  label_feature = info.features[label_key]
  records = []
  for index, example in enumerate(tfds.as_numpy(dataset)):
    label = int(example[label_key])
    class_name = (label_feature.int2str(label) if hasattr(label_feature, "int2str")
                  else str(label))
    payload = example[image_key]
    records.append(ImageRecord(str(class_name), f"{index:07d}",
                               f"tfds:{name}/{split}[{index}]", ("bytes", bytes(payload))))
  if not records:
    raise errors.DataError(f"TFDS dataset {name!r} split {split!r} is empty")
  return records


def scan_source(source: str, tfds_data_dir: Optional[str] = None,
                tfds_download: bool = False, unlabelled: bool = False) -> List[ImageRecord]:
  """Dispatches on the source string: `tfds:name[:split]`, *.zip, or a directory.

  `unlabelled`: images in no class folder are kept, as class "" (see scan_directory).
  """
  if source.startswith("tfds:"):
    parts = source.split(":")
    return scan_tfds(parts[1], parts[2] if len(parts) > 2 else "train", tfds_data_dir,
                     download=tfds_download)
  if source.lower().endswith(".zip"):
    return scan_zip(source, unlabelled)
  if not os.path.exists(source):
    raise errors.DataError(f"{source}: no such file or directory")
  return scan_directory(source, unlabelled)


def collect(sources: Sequence[str], tfds_data_dir=None) -> List[ImageRecord]:
  """Union of several sources (duplicates across them counted once)."""
  if not sources:
    raise errors.ConfigError("no image source given")
  return merge_records([scan_source(s, tfds_data_dir) for s in sources])


def group_by_class(records: Iterable[ImageRecord]) -> Dict[str, List[ImageRecord]]:
  grouped: Dict[str, List[ImageRecord]] = {}
  for record in records:
    grouped.setdefault(record.class_name, []).append(record)
  return {name: grouped[name] for name in sorted(grouped)}


# -- class splits ---------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SplitSpec:
  """Entries (class names or class-path prefixes) per split, and where from."""
  entries: Dict[str, List[str]]
  origin: str
  expected_counts: Optional[Dict[str, int]] = None


def default_omniglot_dir():
  here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return os.environ.get(OMNIGLOT_ENV, os.path.join(here, "..", "shared", "data", "omniglot"))


def load_split_spec(spec: str, protocol_dir: Optional[str] = None) -> SplitSpec:
  """A named protocol (`omniglot_small`) or a JSON file of class lists.

  JSON keys: `train`/`val`/`test` or `meta_train`/`meta_val`/`meta_test`,
  each a list of class names or prefixes; optional `characters` or
  `class_counts` {split: expected number of classes}.
  """
  if spec in NAMED_PROTOCOLS:
    path = os.path.join(protocol_dir or default_omniglot_dir(), NAMED_PROTOCOLS[spec])
  else:
    path = spec
  try:
    with open(path) as handle:
      content = json.load(handle)
  except FileNotFoundError:
    extra = (f" (protocol {spec!r}; set {OMNIGLOT_ENV} or --protocol_dir)"
             if spec in NAMED_PROTOCOLS else
             f"; named protocols are {sorted(NAMED_PROTOCOLS)}")
    raise errors.DataError(f"{path}: no such split file{extra}") from None
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
    raise errors.DataError(f"{path}: not a readable JSON split file ({exc})") from None
  if not isinstance(content, dict):
    raise errors.DataError(f"{path}: expected a JSON object with train/val/test lists")
  entries, counts = {}, {}
  declared = content.get("characters") or content.get("class_counts") or {}
  for split in SPLIT_NAMES:
    for key in (split, "meta_" + split):
      if key in content:
        value = content[key]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
          raise errors.DataError(f"{path}: {key!r} must be a list of class names")
        entries[split] = list(value)
        if isinstance(declared, dict) and key in declared:
          counts[split] = int(declared[key])
  if not entries:
    raise errors.DataError(
        f"{path}: no 'train'/'val'/'test' (or 'meta_train'/...) class lists found")
  seen = {}
  for split, names in entries.items():
    for name in names:
      if name in seen and seen[name] != split:
        raise errors.DataError(
            f"{path}: {name!r} is listed in both {seen[name]} and {split}; "
            "train/val/test classes must not overlap")
      if name in seen:
        raise errors.DataError(f"{path}: {name!r} is listed twice in {split}")
      seen[name] = split
  return SplitSpec(entries, path, counts or None)


def split_spec_from_lists(lists: Dict[str, List[str]], origin: str) -> SplitSpec:
  return SplitSpec({k: list(v) for k, v in lists.items()}, origin)


def _matches(entry, class_name):
  return class_name == entry or class_name.startswith(entry.rstrip("/") + "/")


def assign_classes(class_names: Sequence[str], spec: SplitSpec) -> Dict[str, List[str]]:
  """{split: sorted class names}; checks disjointness, coverage and counts."""
  assigned: Dict[str, List[str]] = {}
  owner = {}
  for split, entries in spec.entries.items():
    chosen = []
    for entry in entries:
      hits = [c for c in class_names if _matches(entry, c)]
      if not hits:
        raise errors.DataError(
            f"{spec.origin}: {split} entry {entry!r} matches no class of the "
            f"image sources (classes look like {sorted(class_names)[:3]})")
      for name in hits:
        if name in owner and owner[name] != split:
          raise errors.DataError(
              f"{spec.origin}: class {name!r} is selected by both {owner[name]} "
              f"and {split}; train/val/test classes must not overlap")
        owner[name] = split
      chosen.extend(hits)
    assigned[split] = sorted(set(chosen))
  if spec.expected_counts:
    for split, expected in spec.expected_counts.items():
      found = len(assigned.get(split, []))
      if found != expected:
        raise errors.DataError(
            f"{spec.origin}: {split} should have {expected} classes but the "
            f"sources give {found}; are all archives/folders passed?")
  return assigned


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


def _luma(rgb):
  """uint8 [H, W, 3] -> [H, W, 1]: ITU-R 601-2 in integers, exactly PIL's "L"."""
  x = tf.cast(rgb, tf.int32)
  y = x[..., 0:1] * 19595 + x[..., 1:2] * 38470 + x[..., 2:3] * 7471 + 32768
  return tf.cast(tf.bitwise.right_shift(y, 16), tf.uint8)


def decode_encoded(encoded, image_size: int, channels: int):
  """Encoded image (scalar string) -> uint8 [image_size, image_size, channels].

  The one preprocessing of pixels: extraction, pretraining and exported
  models all call it. JPEG is decoded with the accurate integer DCT (as PIL
  does), a GIF's first frame is used and 16-bit samples keep their high byte;
  alpha is dropped; colour becomes grey with `_luma`, grey becomes colour by
  repetition; an image not already S x S is stretched to S x S with
  antialiased Lanczos-3 (`tf.image.resize`), rounded and clipped. TensorFlow
  ops only (it runs inside SavedModels); undecodable bytes raise
  InvalidArgumentError.
  """
  encoded = tf.convert_to_tensor(encoded, tf.string)
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


_decode_encoded = tf.function(decode_encoded)


def _corrupt(origin, exc):
  """The DataError for an image that cannot be decoded."""
  text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
  return errors.DataError(
      f"{origin}: unreadable or corrupt image ({type(exc).__name__}: {text}); "
      "replace it, or pass --skip_bad_images to skip and report it")


def _open_checked(payload: bytes, origin: str, options: DecodeOptions):
  """The PIL image, fully read; DataError if corrupt or of another mode/size."""
  try:
    image = Image.open(io.BytesIO(payload))
    image.load()
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
    raise _corrupt(origin, exc) from None
  if image.mode not in options.allowed_modes:
    raise errors.DataError(
        f"{origin}: unexpected image mode {image.mode!r}; allowed modes are "
        f"{list(options.allowed_modes)} (convert the image or pass "
        "--allowed_modes)")
  if options.expected_size and tuple(image.size) != tuple(options.expected_size):
    raise errors.DataError(
        f"{origin}: image is {image.size[0]}x{image.size[1]}, expected "
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
  image = _open_checked(payload, origin, options)
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
    raise _corrupt(origin, exc) from None


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
      _close(cache)


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


def check_nonempty(split_classes: Dict[str, List[str]],
                   by_class: Dict[str, List[ImageRecord]], origin: str):
  for split, names in split_classes.items():
    if not names:
      raise errors.DataError(f"{origin}: split {split!r} has no classes")
    for name in names:
      if not by_class.get(name):
        raise errors.DataError(f"{origin}: class {name!r} ({split}) has no images")


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


def load_labelled_splits(sources: Sequence[str], split: str,
                         protocol_dir: Optional[str] = None,
                         tfds_data_dir: Optional[str] = None,
                         tfds_download: bool = False):
  """Sources + split spec -> (records by class, {split: classes}, split origin).

  A source `csv:<root>` is a miniImageNet CSV root; with `split='csv'` its
  CSVs define the class split. Otherwise `split` is a protocol name or JSON.
  """
  csv_roots = [s[len("csv:"):] for s in sources if s.startswith("csv:")]
  others = [s for s in sources if not s.startswith("csv:")]
  groups, csv_lists = [], {}
  for root in csv_roots:
    records, lists = scan_csv_splits(root)
    groups.append(records)
    for name, classes in lists.items():
      csv_lists.setdefault(name, []).extend(classes)
  groups.extend(scan_source(s, tfds_data_dir, tfds_download) for s in others)
  if not groups:
    raise errors.ConfigError("no image source given (--source)")
  by_class = group_by_class(merge_records(groups))
  if split == "csv":
    if not csv_roots:
      raise errors.ConfigError("--split=csv needs a --source=csv:<miniImageNet root>")
    spec = split_spec_from_lists(csv_lists, ",".join(f"{r}/*.csv" for r in csv_roots))
  else:
    spec = load_split_spec(split, protocol_dir)
  split_classes = assign_classes(list(by_class), spec)
  check_nonempty(split_classes, by_class, spec.origin)
  return by_class, split_classes, spec.origin
