"""Embedding every image of a source, keyed by its file (no class split).

`scripts/extract_embeddings.py --source=DIR_OR_ZIP` without `--split` calls
`extract_all`: every image under the source is embedded, classes come from
folders where there are folders (an image in no class folder is
`unlabelled`), and each key keeps the image's path relative to the source
root (`embedding_keys.make_path_key`, decoded by `embedding_keys.key_file_path`):

    <out>/<dataset_name>/<crop>/all_embeddings.{pkl,npz}
    <out>/<dataset_name>/<crop>/manifest.json   (written last: backbone, class
                                                names, files {path: row})

Images are embedded by `leo_suite.models.image_embedder.ImageEmbedder`, exactly
as split extraction does.
"""

import json
import os
import posixpath
import re
import time
from typing import Callable, List, Sequence

import numpy as np

from leo_suite import errors
from leo_suite import fileio
from leo_suite import safeio
from leo_suite.data import embedding_keys
from leo_suite.data import embeddings as embeddings_lib
from leo_suite.data import image_sources
from leo_suite.data import images as images_lib
from leo_suite.models import image_embedder
from leo_suite.pretrain import extract

ALL = "all"   # the file stem: <out>/<dataset>/<crop>/all_embeddings.<fmt>
KEY_FORMAT = ("path-<class>-<class>_<relative path, encoded by "
              "leo_suite.data.embedding_keys.encode_path; decode a key with key_file_path>")


def relative_path(record: image_sources.ImageRecord) -> str:
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
  return image_sources.merge_records([
      image_sources.scan_source(s, tfds_data_dir, tfds_download, unlabelled=True)
      for s in sources])


def check_all_target(target_dir: str):
  """Refuses a folder that holds a train/val/test extraction (before any work)."""
  manifest_path = os.path.join(target_dir, embeddings_lib.MANIFEST)
  previous = _read_json(manifest_path)
  if previous is not None and set(previous.get("splits", {})) - {ALL}:
    raise errors.UserError(
        f"{manifest_path}: {target_dir} holds a train/val/test extraction; choose another "
        "--dataset_name or --out for this whole-source extraction")


def all_tokens(records: Sequence[image_sources.ImageRecord]) -> dict:
  """{class name: key token} over every record ('' -> embedding_keys.UNLABELLED)."""
  classes = sorted({r.class_name for r in records} - {""})
  tokens = extract.class_tokens(classes, reserved=(embedding_keys.UNLABELLED,))
  tokens[""] = embedding_keys.UNLABELLED
  return tokens


def extract_all(backbone_dir: str, records: List[image_sources.ImageRecord], out_dir: str,
                dataset_name: str, crop: str = "center", fmt: str = "pkl",
                batch_size: int = 256, skip_bad: bool = False, expected_size=None,
                allowed_modes=images_lib.DEFAULT_MODES, sources: Sequence[str] = (),
                log: Callable[[str], None] = print) -> dict:
  """Embeds `records` into all_embeddings.<fmt> + manifest.json; returns the manifest."""
  extract.check_output_names(fmt, dataset_name)
  target_dir = os.path.join(out_dir, dataset_name, crop)
  check_all_target(target_dir)
  embedder = image_embedder.ImageEmbedder(backbone_dir, crop, batch_size, skip_bad,
                                          expected_size, allowed_modes, log)
  started = time.time()
  feats, kept, skipped = embedder.embed_records(records, f"{dataset_name}/{crop}/{ALL}")
  elapsed = time.time() - started
  for origin, reason in skipped:
    log(f"skipped {safeio.display_name(origin, 400)}: {reason}")
  header = extract.manifest_header(
      dataset_name, crop, fmt, extract.backbone_entry(backbone_dir, embedder.description),
      sources, "", {})
  with extract.new_generation(target_dir) as staging:
    return write_all(staging, header, all_tokens(records), [records[i] for i in kept], feats,
                     skipped, elapsed, log)


def write_all(staging: str, manifest: dict, tokens: dict, kept_records: Sequence,
              feats: np.ndarray, skipped, elapsed: float,
              log: Callable[[str], None] = print) -> dict:
  """Writes all_embeddings.<fmt>, then `manifest` (an `extract.manifest_header`) completed,
  into a generation's `staging` folder (`extract.new_generation`).

  `kept_records` (each with .class_name and .file_name) are the rows of `feats`.
  """
  files = [relative_path(r) for r in kept_records]
  keys = [embedding_keys.make_path_key(tokens[r.class_name], f)
          for r, f in zip(kept_records, files)]
  path = os.path.join(staging, f"{ALL}_embeddings.{manifest['format']}")
  used = sorted({r.class_name for r in kept_records})
  extract.write_verified(path, keys, feats, len(used))
  counts = {"num_images": int(feats.shape[0]), "num_classes": len([c for c in used if c]),
            "num_unlabelled": sum(not r.class_name for r in kept_records)}
  manifest.update({
      "key_format": KEY_FORMAT,
      "class_names": {tokens[c]: c for c in used},   # "" = in no class folder
      "splits": {ALL: {
          "file": os.path.basename(path), "sha256": fileio.file_sha256(path),
          **counts,
          "embedding_dim": int(feats.shape[1]),
          "images_per_s": feats.shape[0] / max(elapsed, 1e-9),
          "skipped": [{"image": o, "reason": r} for o, r in skipped]}},
      "files": {f: row for row, f in enumerate(files)},
  })
  extract.write_manifest(staging, manifest)
  log(f"wrote {os.path.basename(path)}: {describe_counts(counts)}, D={feats.shape[1]}")
  return manifest


def describe_counts(counts: dict) -> str:
  """'12 images, 3 classes' (+ ', 2 unlabelled') from a manifest's split entry."""
  text = f"{counts['num_images']} images, {counts['num_classes']} classes"
  return text + (f", {counts['num_unlabelled']} unlabelled" if counts.get("num_unlabelled") else "")


def _read_json(path):
  try:
    with safeio.open_regular(path) as handle:
      value = json.load(handle)
    return value if isinstance(value, dict) else None
  except (OSError, ValueError, errors.DataError):
    return None


def default_dataset_name(sources: Sequence[str]) -> str:
  """A --dataset_name from the first source's name ('my photos.zip' -> 'my_photos')."""
  base = os.path.basename(os.path.normpath(sources[0])) if sources else ""
  base = re.sub(r"\.zip$", "", base, flags=re.IGNORECASE)
  name = re.sub(r"[^A-Za-z0-9._]+", "_", base).strip("._")
  return name if name and name[0].isalnum() else "images"
