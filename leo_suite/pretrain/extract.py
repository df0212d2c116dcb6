"""Embedding extraction: images -> `<out>/<dataset>/<crop>/<split>_embeddings.pkl`.

The files are exactly what the runner reads (`leo_suite.data.embeddings`):
a dict with `keys` `<prefix>-<class>-<class>_<n>.<ext>` and float32
`embeddings` [n, D] (or `.npz` with the same arrays via `--format npz`).
Class names may not contain '-' or '_', so each class gets a safe token (its
alphanumerics, e.g. `Japanese_(katakana)/character01` ->
`Japanesekatakanacharacter01`, suffixed if two collide); the manifest records
token -> original name.

Images are checked by PIL (corrupt files, mode, size: errors name the file)
and decoded by `images.decode_encoded`, the TensorFlow function exported
models run on the images they are sent (decode, grey/colour conversion,
antialiased Lanczos-3 resize; see `images.decode_image`), then scaled to
[0, 1] and inverted as in pretraining (`image_views.preprocess`).

Crops (center, multiview, warps) and the views they average are
`leo_suite.data.image_views`'s.

One extraction is one generation: its split files (each read back with
`load_split`) and its manifest (`manifest.json`, written last, with a
`generation` id and each file's sha256) are written into a staging folder
`<crop>.tmp-<random>` beside `<crop>`, which then replaces `<crop>` by renames
(`fileio.new_generation`). A killed job leaves the previous generation whole
(or nothing), never a mix; the next extraction removes the staging folder.
"""

import datetime
import json
import os
import re
import time
import uuid
from typing import Callable, Dict, List, Sequence

import numpy as np
import tensorflow as tf

from leo_suite import errors
from leo_suite import safeio
from leo_suite import fileio
from leo_suite.data import embedding_keys
from leo_suite.data import embeddings as embeddings_lib
from leo_suite.data import image_sources
from leo_suite.data import image_views
from leo_suite.data import images as images_lib
from leo_suite.data import views as views_lib
from leo_suite.models import backbones
from leo_suite.models import image_embedder
from leo_suite.pretrain import class_splits

FORMATS = ("pkl", "npz")


def class_tokens(class_names: Sequence[str], reserved: Sequence[str] = ()) -> Dict[str, str]:
  """{original class name: safe key token} ([A-Za-z0-9]+, unique, none in `reserved`)."""
  tokens, used = {}, set(reserved)
  for name in class_names:
    base = re.sub(r"[^A-Za-z0-9]", "", name) or "class"
    token, suffix = base, 2
    while token in used:
      token = f"{base}x{suffix}"
      suffix += 1
    used.add(token)
    tokens[name] = token
  return tokens


def _extension(file_name):
  ext = os.path.splitext(file_name)[1].lstrip(".").lower()
  return ext if re.fullmatch(r"[a-z0-9]{1,5}", ext) else "png"


def check_output_names(fmt: str, dataset_name: str):
  """Refuses a --format or --dataset_name that cannot name the output files."""
  if fmt not in FORMATS:
    raise errors.ConfigError(f"--format={fmt!r}: use one of {list(FORMATS)}")
  if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._]*", dataset_name or ""):
    raise errors.ConfigError(
        f"--dataset_name={dataset_name!r}: use letters, digits, '.' and '_' only")


def backbone_entry(backbone_dir: str, description: dict) -> dict:
  """The manifest's "backbone" record of a `backbones.load_backbone` description."""
  return {"dir": os.path.abspath(backbone_dir), "name": description["backbone"],
          "checkpoint_sha256": description["weights_sha256"],
          "image_size": int(description["image_size"]),
          "feature_dim": description["feature_dim"], "invert": bool(description["invert"])}


def manifest_header(dataset_name: str, crop: str, fmt: str, backbone: dict,
                    sources: Sequence[str], split_origin: str, class_names: dict) -> dict:
  """A manifest without its splits (`backbone`: a `backbone_entry`)."""
  return {
      "dataset_name": dataset_name, "crop": crop,
      "crop_description": image_views.CROP_DESCRIPTIONS[crop], "format": fmt,
      "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "backbone": backbone, "sources": list(sources), "split_origin": split_origin,
      "class_names": class_names, "splits": {},
      "generation": uuid.uuid4().hex,   # one id per extraction: its folder's files all belong to it
  }


def split_records(by_class: Dict[str, List[image_sources.ImageRecord]],
                  classes: Sequence[str]) -> List[image_sources.ImageRecord]:
  """A split's records in extraction order: class by class, each in file order."""
  return [r for c in classes for r in by_class[c]]


def split_keys(split: str, classes: Sequence[str], tokens: Dict[str, str],
               kept_records: Sequence, num_skipped: int) -> List[str]:
  """The keys of a split's kept records (each with .class_name and .file_name), in order."""
  counters: Dict[str, int] = {}
  keys = []
  for record in kept_records:
    token = tokens[record.class_name]
    counters[token] = counters.get(token, 0) + 1
    keys.append(embedding_keys.make_key(token, counters[token], prefix=split,
                                        ext=_extension(record.file_name)))
  empty = [c for c in classes if tokens[c] not in counters]
  if empty:
    raise errors.DataError(
        f"class {empty[0]!r} ({split}) has no readable images left after skipping "
        f"{num_skipped} bad image(s); nothing was written for {split}")
  return keys


def write_verified(path: str, keys: Sequence[str], feats: np.ndarray, num_classes: int):
  """Writes a split file atomically, drops a stale one of the other format, reads it back."""
  embeddings_lib.write_split(path, keys, feats)
  stem = path[:-len(".npz")] if path.endswith(".npz") else path[:-len(".pkl")]
  other = stem + (".pkl" if path.endswith(".npz") else ".npz")
  if os.path.exists(other):  # a stale file of the other format would shadow/confuse
    os.remove(other)
  check = embeddings_lib.load_split(path)
  if check.embeddings.shape != feats.shape or check.num_classes != num_classes:
    raise errors.DataError(f"{path}: read back {check.embeddings.shape} / "
                           f"{check.num_classes} classes, wrote {feats.shape} / {num_classes}")


def write_split_file(target_dir: str, split: str, fmt: str, keys: Sequence[str],
                     num_classes: int, feats: np.ndarray, skipped, elapsed: float,
                     log: Callable[[str], None] = print) -> dict:
  """Writes <split>_embeddings.<fmt>; returns its manifest entry."""
  path = os.path.join(target_dir, f"{split}_embeddings.{fmt}")
  write_verified(path, keys, feats, num_classes)
  log(f"wrote {os.path.basename(path)}: {feats.shape[0]} images, {num_classes} classes, "
      f"D={feats.shape[1]}")
  return {
      "file": os.path.basename(path), "sha256": fileio.file_sha256(path),
      "num_images": int(feats.shape[0]), "num_classes": num_classes,
      "embedding_dim": int(feats.shape[1]), "images_per_s": feats.shape[0] / max(elapsed, 1e-9),
      "skipped": [{"image": o, "reason": r} for o, r in skipped],
  }


def extract_embeddings(backbone_dir: str, by_class: Dict[str, List[image_sources.ImageRecord]],
                       split_classes: Dict[str, List[str]], out_dir: str,
                       dataset_name: str, crop: str = "center", fmt: str = "pkl",
                       batch_size: int = 256, skip_bad: bool = False,
                       expected_size=None, allowed_modes=images_lib.DEFAULT_MODES,
                       sources: Sequence[str] = (), split_origin: str = "",
                       log: Callable[[str], None] = print,
                       rotated_splits: Sequence[str] = (),
                       view_splits: Sequence[str] = ()) -> dict:
  """Extracts every split; returns the manifest (also written beside the files).

  Each split in `rotated_splits` also gets its classes turned by 90, 180 and
  270 degrees (counter-clockwise, as pretraining's rotated copies), each turn
  a class of its own named `<class>@rot<degrees>` (Omniglot's convention for
  meta-training classes); its file then holds 4x the classes, the turned
  ones after the upright ones, and the manifest lists `rotated_splits`.
  Each split in `view_splits` also gets `<split>_views.npz`: every view of
  every image embedded on its own (`leo_suite.data.views`), from the same pass
  as its averaged row; the manifest lists it under `views`."""
  if crop not in image_views.CROPS:
    raise errors.ConfigError(f"--crop={crop!r}: use one of {list(image_views.CROPS)}")
  check_output_names(fmt, dataset_name)
  if batch_size < 1:
    raise errors.ConfigError(f"--batch_size={batch_size} must be >= 1")
  class_splits.check_nonempty(split_classes, by_class, split_origin or "splits")
  model, description = backbones.load_backbone(backbone_dir)
  image_size = int(description["image_size"])
  options = images_lib.DecodeOptions(image_views.load_size(crop, image_size),
                                     int(description["channels"]), expected_size,
                                     tuple(allowed_modes), skip_bad)
  features_fn = image_views.feature_function(model, crop, image_size,
                                             bool(description["invert"]))
  with_views = image_views.feature_function(model, crop, image_size,
                                            bool(description["invert"]), with_views=True)
  check_split_names(split_classes)
  rotated, viewed = sorted(set(rotated_splits)), sorted(set(view_splits))
  for flag, names in (("rotated_splits", rotated), ("view_splits", viewed)):
    if set(names) - set(split_classes):
      raise errors.ConfigError(f"--{flag}={names}: only {sorted(split_classes)} "
                               "are extracted")
  all_classes = [c for split in split_classes for c in split_classes[split]] + [
      rotated_name(c, turns) for split in rotated for turns in ROTATION_TURNS
      for c in split_classes[split]]
  tokens = class_tokens(all_classes)
  manifest = manifest_header(dataset_name, crop, fmt, backbone_entry(backbone_dir, description),
                             sources, split_origin, {tokens[c]: c for c in all_classes})
  if rotated:
    manifest["rotated_splits"] = rotated
  if viewed:
    manifest["views"] = {}
  with new_generation(os.path.join(out_dir, dataset_name, crop)) as staging:
    for split, classes in split_classes.items():
      records = split_records(by_class, classes)
      t0 = time.time()
      split_fn = with_views if split in viewed else features_fn
      feats, kept, skipped = image_embedder.extract_split(
          turned_features(split_fn) if split in rotated else split_fn, records,
          options, batch_size, f"{dataset_name}/{crop}/{split}", log)
      for origin, reason in skipped:
        log(f"skipped {safeio.display_name(origin, 400)}: {reason}")
      kept_records = [records[i] for i in kept]
      keys = split_keys(split, classes, tokens, kept_records, len(skipped))
      num_classes = len(classes)
      if split in rotated:  # [n, 4 D] side by side -> [4 n, D], upright rows first
        feats = np.concatenate(np.split(feats, 1 + len(ROTATION_TURNS), axis=1))
        num_classes *= 1 + len(ROTATION_TURNS)
        for turns in ROTATION_TURNS:
          keys += split_keys(split, classes, {c: tokens[rotated_name(c, turns)] for c in classes},
                             kept_records, len(skipped))
      if split in viewed:  # [n, (1 + V) D]: the mean, then each view
        dim = feats.shape[1] // (1 + image_views.num_views(crop))
        manifest["views"][split] = write_views_file(
            staging, split, keys, feats[:, dim:].reshape(len(keys), -1, dim))
        feats = feats[:, :dim]
      manifest["splits"][split] = write_split_file(staging, split, fmt, keys, num_classes,
                                                   feats, skipped, time.time() - t0, log)
    write_manifest(staging, manifest)
  return manifest


def write_views_file(staging: str, split: str, keys: Sequence[str], views: np.ndarray) -> dict:
  """Writes `<split>_views.npz`; returns its manifest entry."""
  path = os.path.join(staging, split + views_lib.VIEWS_SUFFIX)
  views_lib.write_views(path, keys, views)
  return {"file": os.path.basename(path), "sha256": fileio.file_sha256(path),
          "num_views": int(views.shape[1])}


# Quarter turns of the rotated splits' extra classes (pretraining's rotated copies).
ROTATION_TURNS = (1, 2, 3)


def rotated_name(class_name: str, turns: int) -> str:
  """The class of `class_name`'s images turned by 90 * `turns` degrees."""
  return f"{class_name}@rot{90 * turns}"


def turned_features(features_fn):
  """features_fn of each decoded batch upright and turned by ROTATION_TURNS
  quarter turns counter-clockwise (tf.image.rot90, np.rot90's direction)
  before any view, side by side: [B, 4 D] from one decode of the images."""
  return tf.function(
      lambda batch: tf.concat([features_fn(tf.image.rot90(batch, turns))
                               for turns in (0,) + ROTATION_TURNS], axis=1),
      reduce_retracing=True, autograph=False)


SHARDS_DIR = "shards"   # sharded extraction's folder inside <crop>, carried to each generation


def new_generation(target_dir: str):
  """`fileio.new_generation` of a <dataset>/<crop> folder: its shards folder carried over."""
  return fileio.new_generation(target_dir, carry=(SHARDS_DIR,))


def write_manifest(staging: str, manifest: dict):
  """Writes `manifest` (last) into a generation's staging folder."""
  fileio.atomic_write_text(os.path.join(staging, embeddings_lib.MANIFEST),
                           json.dumps(manifest, indent=2, sort_keys=True))


def check_split_names(split_classes: Dict[str, List[str]]):
  unknown = [s for s in split_classes if s not in embeddings_lib.SPLITS]
  if unknown:  # split names become file names: only the known ones
    raise errors.UserError(f"unknown split name(s) {unknown}; expected {embeddings_lib.SPLITS}")


def benchmark_extraction(backbone: str = "conv4", image_size: int = 28, channels: int = 1,
                         batch_size: int = 128, num_images: int = 1024,
                         crop: str = "center", seed: int = 0, details: bool = False):
  """Images/s of batched extraction (random weights, synthetic uint8 images).

  Runs the same tf.data -> tf.function path as `extract_split`, after one
  warm-up batch (tracing excluded). Typical calls: conv4 at 28x28, resnet12
  at 84x84. With `details`, returns a dict that also has images per
  process-CPU-second and the 1-minute load average (wall-clock rates on a
  shared machine depend on the other jobs).
  """
  tf.keras.utils.set_random_seed(seed)
  model = backbones.build_backbone(backbone, image_size, channels)
  size = image_views.load_size(crop, image_size)
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, [num_images, size, size, channels], np.uint8)
  features_fn = image_views.feature_function(model, crop, image_size, invert=False)
  dataset = tf.data.Dataset.from_tensor_slices(images).batch(batch_size).prefetch(2)
  features_fn(tf.constant(images[:batch_size]))  # trace + warm up
  start, cpu_start = time.time(), time.process_time()
  count = 0
  for batch in dataset:
    count += int(features_fn(batch).shape[0])
  rate = count / (time.time() - start)
  if not details:
    return rate
  return {"images_per_s": rate,
          "images_per_cpu_s": count / max(time.process_time() - cpu_start, 1e-9),
          "load_average_1min": os.getloadavg()[0], "backbone": backbone,
          "image_size": image_size, "batch_size": batch_size, "num_images": count}
