"""Labelled image sources: folders, zip archives, TFDS and miniImageNet CSVs.

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
"""

import csv
import dataclasses
import hashlib
import io
import os
import posixpath
import sys
import zipfile
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from leo_suite import errors
from leo_suite import safe_decode
from leo_suite import safeio

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif",
                    ".tiff", ".webp")
SPLIT_NAMES = ("train", "val", "test")


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
    """The image's bytes: a regular file, or a zip member, under the caps (leo_suite/safeio.py)."""
    kind = self.location[0]
    try:
      if kind == "file":
        return safeio.read_bytes(self.location[1])
      if kind == "zip":
        cache = zip_cache if zip_cache is not None else {}
        archive = cache.get(self.location[1])
        if archive is None:
          archive = cache[self.location[1]] = open_archive(self.location[1])
        return safe_decode.read_zip_member(archive, self.location[2],
                                           what=safeio.display_name(self.location[1]))
      return self.location[1]
    except (OSError, zipfile.BadZipFile, KeyError) as exc:
      raise errors.DataError(f"{self.origin}: cannot read ({exc})") from None


def open_archive(path: str) -> zipfile.ZipFile:
  """Zip `path` read in place, if it is a regular file (a FIFO is refused, not waited on).

  Any size: each member is checked (`safe_decode.check_zip_member`) before it is
  read. `close_archives` closes the file too.
  """
  handle = safeio.open_regular(path, max_bytes=sys.maxsize)
  try:
    return zipfile.ZipFile(handle)
  except BaseException:
    handle.close()
    raise


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
    archive = open_archive(path)
    try:
      infos = [i for i in archive.infolist()
               if not i.filename.endswith("/") and _is_image(i.filename)
               and not posixpath.basename(i.filename).startswith("._")
               and not i.filename.startswith("__MACOSX/")]
      for info in infos:   # encrypted, too large or a bomb: refused before any is read
        safe_decode.check_zip_member(info, safeio.display_name(path))
    finally:
      close_archives({path: archive})
  except (zipfile.BadZipFile, OSError) as exc:
    raise errors.DataError(f"{path}: not a readable zip archive ({exc})") from None
  members = [i.filename for i in infos]
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
  close_archives(cache)
  return [merged[key] for key in sorted(merged)]


def close_archives(cache):
  """Closes the archives of `open_archive` in `cache`, and their files."""
  for archive in cache.values():
    handle = archive.fp
    archive.close()
    if handle is not None:
      handle.close()
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
    try:   # a regular file: a FIFO is refused
      text = safeio.read_bytes(csv_path).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
      raise errors.DataError(f"{safeio.display_name(csv_path)}: not UTF-8 text (byte "
                             f"{exc.start}); save it as a UTF-8 CSV") from None
    rows = list(csv.reader(io.StringIO(text, newline="")))
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
