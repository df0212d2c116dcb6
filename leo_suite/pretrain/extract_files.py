"""Embedding every image of a source, keyed by its file (no class split).

`scripts/extract_embeddings.py --source=DIR_OR_ZIP` without `--split` calls
`extract_all`: every image under the source is embedded, classes come from
folders where there are folders (an image in no class folder is
`unlabelled`), and each key keeps the image's path relative to the source
root (`embeddings.make_path_key`, decoded by `embeddings.key_file_path`):

    <out>/<dataset_name>/<crop>/all_embeddings.{pkl,npz}
    <out>/<dataset_name>/<crop>/manifest.json   (written last: backbone, class
                                                names, files {path: row})

`ImageEmbedder` is the one way images become embeddings outside the split
extraction: the backbone of a pretraining run, `images.decode_encoded` and
`extract.embed` through `extract.extract_split`, exactly as extraction runs
them. Support and query sets (`leo_suite.serving.sets`) use it too.
"""

import datetime
import json
import os
import posixpath
import re
import time
from typing import Callable, List, Sequence

import numpy as np

from leo_suite import errors
from leo_suite import fileio
from leo_suite.data import embeddings as embeddings_lib
from leo_suite.pretrain import extract
from leo_suite.pretrain import images as images_lib
from leo_suite.pretrain import train as train_lib

ALL = "all"   # the file stem: <out>/<dataset>/<crop>/all_embeddings.<fmt>
KEY_FORMAT = ("path-<class>-<class>_<relative path, encoded by "
              "leo_suite.data.embeddings.encode_path; decode a key with key_file_path>")


class ImageEmbedder:
  """A pretrained backbone embedding `ImageRecord`s as extraction does."""

  def __init__(self, backbone_dir: str, crop: str = "center", batch_size: int = 64,
               skip_bad: bool = False, expected_size=None,
               allowed_modes=images_lib.DEFAULT_MODES, log: Callable[[str], None] = None):
    if crop not in extract.CROPS:
      raise errors.ConfigError(f"--crop={crop!r}: use one of {list(extract.CROPS)}")
    if batch_size < 1:
      raise errors.ConfigError(f"--batch_size={batch_size} must be >= 1")
    self.backbone_dir, self.crop, self.batch_size = backbone_dir, crop, batch_size
    self.model, self.description = train_lib.load_backbone(backbone_dir)
    size = int(self.description["image_size"])
    self.options = images_lib.DecodeOptions(
        extract.load_size(crop, size),
        int(self.description["channels"]), expected_size, tuple(allowed_modes), skip_bad)
    self.features_fn = extract.feature_function(self.model, crop, size,
                                                bool(self.description["invert"]))
    self.log = log or (lambda _: None)

  @property
  def feature_dim(self) -> int:
    return int(self.description["feature_dim"])

  def embed_records(self, records: Sequence[images_lib.ImageRecord], label: str):
    """(features [n_kept, D] float32, kept record indices, skipped (origin, reason))."""
    return extract.extract_split(self.features_fn, list(records), self.options,
                                 self.batch_size, label, self.log)

  def __call__(self, records: Sequence[images_lib.ImageRecord], label: str) -> np.ndarray:
    """Features [n, D] of every record (a bad image raises, naming its file)."""
    return self.embed_records(records, label)[0]


def relative_path(record: images_lib.ImageRecord) -> str:
  """The image's path under its source root ('class/folders/file.png')."""
  return posixpath.join(record.class_name, record.file_name)


def scan_all(sources: Sequence[str], tfds_data_dir=None, tfds_download=False):
  """Every image of the sources (duplicates across them once), classes or ''."""
  if not sources:
    raise errors.ConfigError("no image source given (--source)")
  csv_sources = [s for s in sources if s.startswith("csv:")]
  if csv_sources:
    raise errors.ConfigError(
        f"--source={csv_sources[0]}: a miniImageNet CSV root defines its own split; "
        "pass --split=csv, or give the image folder itself as --source")
  return images_lib.merge_records([
      images_lib.scan_source(s, tfds_data_dir, tfds_download, unlabelled=True)
      for s in sources])


def extract_all(backbone_dir: str, records: List[images_lib.ImageRecord], out_dir: str,
                dataset_name: str, crop: str = "center", fmt: str = "pkl",
                batch_size: int = 256, skip_bad: bool = False, expected_size=None,
                allowed_modes=images_lib.DEFAULT_MODES, sources: Sequence[str] = (),
                log: Callable[[str], None] = print) -> dict:
  """Embeds `records` into all_embeddings.<fmt> + manifest.json; returns the manifest."""
  if fmt not in extract.FORMATS:
    raise errors.ConfigError(f"--format={fmt!r}: use one of {list(extract.FORMATS)}")
  if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._]*", dataset_name or ""):
    raise errors.ConfigError(
        f"--dataset_name={dataset_name!r}: use letters, digits, '.' and '_' only")
  target_dir = os.path.join(out_dir, dataset_name, crop)
  manifest_path = os.path.join(target_dir, extract.MANIFEST)
  previous = _read_json(manifest_path)
  if previous is not None and set(previous.get("splits", {})) - {ALL}:
    raise errors.UserError(
        f"{manifest_path}: {target_dir} holds a train/val/test extraction; choose another "
        "--dataset_name or --out for this whole-source extraction")
  embedder = ImageEmbedder(backbone_dir, crop, batch_size, skip_bad, expected_size,
                           allowed_modes, log)
  classes = sorted({r.class_name for r in records} - {""})
  tokens = extract.class_tokens(classes, reserved=(embeddings_lib.UNLABELLED,))
  tokens[""] = embeddings_lib.UNLABELLED
  started = time.time()
  feats, kept, skipped = embedder.embed_records(records, f"{dataset_name}/{crop}/{ALL}")
  elapsed = time.time() - started
  for origin, reason in skipped:
    log(f"skipped {origin}: {reason}")
  kept_records = [records[i] for i in kept]
  files = [relative_path(r) for r in kept_records]
  keys = [embeddings_lib.make_path_key(tokens[r.class_name], f)
          for r, f in zip(kept_records, files)]
  path = os.path.join(target_dir, f"{ALL}_embeddings.{fmt}")
  embeddings_lib.write_split(path, keys, feats)
  other = os.path.join(target_dir, f"{ALL}_embeddings.{'npz' if fmt == 'pkl' else 'pkl'}")
  if os.path.exists(other):   # a stale file of the other format would confuse
    os.remove(other)
  check = embeddings_lib.load_split(path)
  used = sorted({r.class_name for r in kept_records})
  if check.embeddings.shape != feats.shape or check.num_classes != len(used):
    raise errors.DataError(f"{path}: read back {check.embeddings.shape} / "
                           f"{check.num_classes} classes, wrote {feats.shape} / {len(used)}")
  description = embedder.description
  counts = {"num_images": int(feats.shape[0]), "num_classes": len([c for c in used if c]),
            "num_unlabelled": sum(not r.class_name for r in kept_records)}
  manifest = {
      "dataset_name": dataset_name, "crop": crop, "format": fmt,
      "crop_description": extract.CROP_DESCRIPTIONS[crop],
      "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "backbone": {"dir": os.path.abspath(backbone_dir), "name": description["backbone"],
                   "checkpoint_sha256": description["weights_sha256"],
                   "image_size": int(description["image_size"]),
                   "feature_dim": description["feature_dim"],
                   "invert": bool(description["invert"])},
      "sources": list(sources), "split_origin": "",
      "key_format": KEY_FORMAT,
      "class_names": {tokens[c]: c for c in used},   # "" = in no class folder
      "splits": {ALL: {
          "file": os.path.basename(path), "sha256": train_lib.file_sha256(path),
          **counts,
          "embedding_dim": int(feats.shape[1]),
          "images_per_s": feats.shape[0] / max(elapsed, 1e-9),
          "skipped": [{"image": o, "reason": r} for o, r in skipped]}},
      "files": {f: row for row, f in enumerate(files)},
  }
  fileio.atomic_write_text(manifest_path, json.dumps(manifest, indent=2, sort_keys=True))
  log(f"wrote {path}: {describe_counts(counts)}, D={feats.shape[1]}")
  return manifest


def describe_counts(counts: dict) -> str:
  """'12 images, 3 classes' (+ ', 2 unlabelled') from a manifest's split entry."""
  text = f"{counts['num_images']} images, {counts['num_classes']} classes"
  return text + (f", {counts['num_unlabelled']} unlabelled" if counts.get("num_unlabelled") else "")


def _read_json(path):
  try:
    with open(path) as handle:
      value = json.load(handle)
    return value if isinstance(value, dict) else None
  except (OSError, ValueError):
    return None


def default_dataset_name(sources: Sequence[str]) -> str:
  """A --dataset_name from the first source's name ('my photos.zip' -> 'my_photos')."""
  base = os.path.basename(os.path.normpath(sources[0])) if sources else ""
  base = re.sub(r"\.zip$", "", base, flags=re.IGNORECASE)
  name = re.sub(r"[^A-Za-z0-9._]+", "_", base).strip("._")
  return name if name and name[0].isalnum() else "images"
