"""Extraction beyond one device: disjoint shards, then one merge.

`scripts/extract_embeddings.py --num_shards=S --shard_index=i` embeds the batches
b % S == i of every split (record j in batch j // batch_size, j counting in the
single-process extraction's order: `extract.split_records`, or the scanned order
without --split): each image is embedded in the very batch the single-process
extraction (same --batch_size) puts it in, as kernels for tiny batches may round
differently. Each shard writes

    <out>/<dataset>/<crop>/shards/shard-0000i-of-0000S/<split>_shard.npz
        indices (row -> record number j), embeddings, classes, files
    .../shard-0000i-of-0000S/manifest.json   (written last: settings, counts,
        skipped images, each file's sha256)

so a killed shard has no manifest. A finished shard rerun with the same settings
does nothing (its files checked against their sha256); other settings redo it.

`--merge` (same --out / --dataset_name / --crop) refuses, before writing anything,
a missing or unfinished shard, a shard file not in its folder or not matching its
sha256, an unknown split, shards of another --num_shards, backbone, source, split,
crop, format or decoding options, rows that do not cover every record exactly once,
and NaN/inf rows. Then it writes one new generation of <crop> (`extract.new_generation`:
the shards folder carried into it): the split files (the single-process extraction's
byte for byte but for rounding after skipped bad images, which shift the batches)
and the manifest (adding `"shards"`). The shards folder is then removed (not if keep_shards).
"""

import collections
import dataclasses
import datetime
import hashlib
import io
import json
import os
import shutil
import time
import zipfile
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from leo_suite import errors
from leo_suite import fileio
from leo_suite import safe_decode
from leo_suite import safeio
from leo_suite.data import embeddings as embeddings_lib
from leo_suite.data import image_sources
from leo_suite.data import images as images_lib
from leo_suite.models import image_embedder
from leo_suite.pretrain import class_splits
from leo_suite.pretrain import extract
from leo_suite.pretrain import extract_files

SHARDS_DIR = extract.SHARDS_DIR
SPLIT_MODE, ALL_MODE = "splits", "all"
_Row = collections.namedtuple("_Row", "class_name file_name")


def shard_name(index: int, num_shards: int) -> str:
  return f"shard-{index:05d}-of-{num_shards:05d}"


def shards_dir(out_dir: str, dataset_name: str, crop: str) -> str:
  return os.path.join(out_dir, dataset_name, crop, SHARDS_DIR)


def check_flags(num_shards: int, shard_index: Optional[int], merge: bool):
  """Refuses inconsistent --num_shards / --shard_index / --merge."""
  if num_shards < 1:
    raise errors.ConfigError(f"--num_shards={num_shards} must be >= 1")
  if shard_index is None:
    if num_shards > 1 and not merge:
      raise errors.ConfigError(
          f"--num_shards={num_shards} needs --shard_index (0 to {num_shards - 1}) for a "
          "shard run, or --merge to combine finished shards")
    return
  if merge:
    raise errors.ConfigError("--merge combines every finished shard: drop --shard_index")
  if not 0 <= shard_index < num_shards:
    raise errors.ConfigError(
        f"--shard_index={shard_index}: use 0 to {num_shards - 1} (--num_shards={num_shards})")


@dataclasses.dataclass
class Plan:
  """What a whole extraction embeds: {split: records in extraction order}."""
  mode: str
  records: Dict[str, List[image_sources.ImageRecord]]
  classes: Dict[str, List[str]]     # split -> class names (SPLIT_MODE); {} in ALL_MODE
  tokens: Dict[str, str]            # class name -> key token
  sources: List[str]
  split_origin: str = ""


def plan_splits(by_class, split_classes: Dict[str, List[str]], sources: Sequence[str],
                split_origin: str) -> Plan:
  """The plan of `extract.extract_embeddings` with the same arguments."""
  class_splits.check_nonempty(split_classes, by_class, split_origin or "splits")
  extract.check_split_names(split_classes)
  all_classes = [c for split in split_classes for c in split_classes[split]]
  return Plan(SPLIT_MODE, {s: extract.split_records(by_class, c) for s, c in split_classes.items()},
              {s: list(c) for s, c in split_classes.items()}, extract.class_tokens(all_classes),
              list(sources), split_origin)


def plan_all(records: List[image_sources.ImageRecord], sources: Sequence[str]) -> Plan:
  """The plan of `extract_files.extract_all` with the same arguments."""
  return Plan(ALL_MODE, {extract_files.ALL: list(records)}, {},
              extract_files.all_tokens(records), list(sources))


def _fingerprint(records) -> str:
  text = json.dumps([[r.class_name, r.file_name] for r in records])
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _settings(plan: Plan, checkpoint_sha256: str, dataset_name, crop, fmt, num_shards,
              batch_size, skip_bad, expected_size, allowed_modes) -> dict:
  """Everything every shard of one extraction must share (compared by the merge)."""
  return {
      "mode": plan.mode, "num_shards": num_shards, "batch_size": batch_size,
      "dataset_name": dataset_name, "crop": crop, "format": fmt,
      "checkpoint_sha256": checkpoint_sha256,
      "sources": list(plan.sources), "split_origin": plan.split_origin,
      "split_classes": plan.classes, "class_names": {t: c for c, t in plan.tokens.items()},
      "records": {s: {"num_records": len(r), "sha256": _fingerprint(r)}
                  for s, r in plan.records.items()},
      "skip_bad_images": bool(skip_bad), "allowed_modes": list(allowed_modes),
      "expected_size": list(expected_size) if expected_size else None}


def shard_rows(num_records: int, batch_size: int, num_shards: int, shard_index: int):
  """Record numbers (int64, ascending) of a shard: those in batches b % num_shards == index."""
  rows = np.arange(num_records, dtype=np.int64)
  return rows[(rows // batch_size) % num_shards == shard_index]


def extract_shard(backbone_dir: str, plan: Plan, out_dir: str, dataset_name: str,
                  num_shards: int, shard_index: int, crop: str = "center", fmt: str = "pkl",
                  batch_size: int = 256, skip_bad: bool = False, expected_size=None,
                  allowed_modes=images_lib.DEFAULT_MODES,
                  log: Callable[[str], None] = print) -> dict:
  """Embeds shard `shard_index` of `num_shards`; returns its manifest (written last)."""
  check_flags(num_shards, shard_index, False)
  extract.check_output_names(fmt, dataset_name)
  if plan.mode == ALL_MODE:
    extract_files.check_all_target(os.path.join(out_dir, dataset_name, crop))
  embedder = image_embedder.ImageEmbedder(backbone_dir, crop, batch_size, skip_bad,
                                          expected_size, allowed_modes, log)
  settings = _settings(plan, embedder.description["weights_sha256"], dataset_name, crop, fmt,
                       num_shards, batch_size, skip_bad, expected_size, allowed_modes)
  name = shard_name(shard_index, num_shards)
  folder = os.path.join(shards_dir(out_dir, dataset_name, crop), name)
  manifest_path = os.path.join(folder, embeddings_lib.MANIFEST)
  try:
    previous = _read_manifest(folder, name)
    if previous is not None and previous.get("settings") == settings:
      _check_files(folder, name, previous)
      log(f"{name}: already complete with these settings; nothing to do")
      return previous
  except errors.DataError:
    pass   # unreadable or changed: extract it again
  if os.path.exists(manifest_path):   # from now on the folder is unfinished
    os.remove(manifest_path)
  entries = {}
  for split, records in plan.records.items():
    indices = shard_rows(len(records), batch_size, num_shards, shard_index)
    mine = [records[i] for i in indices]
    started = time.time()
    feats, kept, skipped = embedder.embed_records(
        mine, f"{dataset_name}/{crop}/{split} {name}", allow_empty=True)
    elapsed = time.time() - started
    for origin, reason in skipped:
      log(f"skipped {safeio.display_name(origin, 400)}: {reason}")
    rows = indices[kept]
    skipped_rows = sorted(set(indices.tolist()) - set(rows.tolist()))
    path = os.path.join(folder, f"{split}_shard.npz")
    buffer = io.BytesIO()
    np.savez(buffer, indices=rows, embeddings=feats,
             classes=np.asarray([mine[k].class_name for k in kept], np.str_),
             files=np.asarray([mine[k].file_name for k in kept], np.str_))
    fileio.atomic_write_bytes(path, buffer.getvalue())
    entries[split] = {
        "file": os.path.basename(path), "sha256": fileio.file_sha256(path),
        "num_records": len(mine), "num_images": int(feats.shape[0]), "elapsed_s": elapsed,
        "skipped": [{"index": i, "image": o, "reason": r}
                    for i, (o, r) in zip(skipped_rows, skipped)]}
  manifest = {
      "shard_index": shard_index, "num_shards": num_shards, "settings": settings,
      "backbone": extract.backbone_entry(backbone_dir, embedder.description),
      "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "splits": entries}
  fileio.atomic_write_text(manifest_path, json.dumps(manifest, indent=2, sort_keys=True))
  return manifest


def _rerun(name: str) -> str:
  index, num_shards = (int(part) for part in name.split("-")[1::2])
  return f"rerun it: --num_shards={num_shards} --shard_index={index}"


def _read_manifest(folder: str, name: str) -> Optional[dict]:
  """A shard's manifest, None if it has none; a malformed one is a DataError."""
  path = os.path.join(folder, embeddings_lib.MANIFEST)
  if not os.path.exists(path):
    return None
  try:
    manifest = json.loads(safeio.read_bytes(path))   # a regular file, or DataError
    if not isinstance(manifest, dict):
      raise ValueError("not an object")
    for key in ("shard_index", "num_shards", "settings", "backbone", "splits"):
      manifest[key]   # pylint: disable=pointless-statement
  except (OSError, ValueError, KeyError) as exc:
    raise errors.DataError(f"{path}: unreadable shard manifest ({exc}); {_rerun(name)}") from None
  return manifest


def _refusal(folder: str, name: str, text) -> errors.DataError:
  manifest = safeio.display_name(os.path.join(folder, embeddings_lib.MANIFEST))
  return errors.DataError(safeio.one_line(f"{manifest}: {text}; {_rerun(name)}"))


def _shard_file(folder: str, name: str, split: str, entry: dict) -> str:
  """A split's shard file: its manifest's "file" entry, one name inside `folder`."""
  try:
    return safeio.child_path(folder, entry.get("file", ""), what=f"the {split} split's file")
  except errors.DataError as exc:
    raise _refusal(folder, name, exc) from None


def _check_names(folder: str, name: str, manifest: dict):
  """Split names and the format become file names: only known ones (before any write)."""
  settings = manifest["settings"]
  known = (extract_files.ALL,) if settings["mode"] == ALL_MODE else embeddings_lib.SPLITS
  checks = [("split", split, known) for split in [
      *manifest["splits"], *settings["records"], *settings["split_classes"]]]
  for what, value, allowed in checks + [("format", settings["format"], extract.FORMATS)]:
    if value not in allowed:
      raise _refusal(folder, name, f"{what} {safeio.quoted(value)} is not one of {list(allowed)}")


def _check_files(folder: str, name: str, manifest: dict):
  """Every file the shard manifest lists is there with its sha256."""
  for split, entry in manifest["splits"].items():
    path = _shard_file(folder, name, split, entry)
    if not os.path.isfile(path):
      raise errors.DataError(f"{name}: {path} is missing ({split}); {_rerun(name)}")
    if fileio.file_sha256(path) != entry.get("sha256"):
      raise errors.DataError(
          f"{name}: {path} does not match the sha256 in its manifest (changed or "
          f"truncated); {_rerun(name)}")


def _find_shards(root: str, num_shards: Optional[int]) -> List[str]:
  """The shard folder names of one complete set under `root` (else a clear error)."""
  names = sorted(n for n in (os.listdir(root) if os.path.isdir(root) else ())
                 if n.startswith("shard-"))
  counts = sorted({int(n.rsplit("-of-", 1)[-1]) for n in names if n[-5:].isdigit()})
  if not counts:
    raise errors.DataError(f"no shards under {root}: run the shards first "
                           "(--num_shards=S --shard_index=i for i = 0 .. S-1)")
  if len(counts) > 1 or (num_shards is not None and counts != [num_shards]):
    raise errors.DataError(
        f"{root} holds shards of --num_shards={'/'.join(map(str, counts))}"
        + (f", not {num_shards}" if num_shards is not None else "")
        + ": remove the stale shard folders")
  num_shards = counts[0]
  for index in range(num_shards):
    if shard_name(index, num_shards) not in names:
      raise errors.DataError(f"shard {index} of {num_shards} is missing (no "
                             f"{os.path.join(root, shard_name(index, num_shards))}); run it: "
                             f"--num_shards={num_shards} --shard_index={index}")
  return [shard_name(i, num_shards) for i in range(num_shards)]


def _load_part(name: str, folder: str, split: str, entry: dict):
  path = _shard_file(folder, name, split, entry)
  safe_decode.check_npz(path)   # a regular file whose members are no bomb, before np.load
  try:
    with np.load(path, allow_pickle=False) as data:
      part = {k: data[k] for k in ("indices", "embeddings", "classes", "files")}
  except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
    raise errors.DataError(f"{path}: unreadable shard file ({exc}); {_rerun(name)}") from None
  if len({len(column) for column in part.values()}) != 1 or part["embeddings"].ndim != 2:
    raise errors.DataError(f"{path}: malformed shard file; {_rerun(name)}")
  return part


def _mismatch(name: str, first: str, key: str, value, expected) -> errors.DataError:
  if key == "checkpoint_sha256":
    return errors.DataError(
        f"{name} was extracted with another backbone (checkpoint sha256 {str(value)[:12]}..., "
        f"{first}: {str(expected)[:12]}...); {_rerun(name)} with the same --backbone_dir")
  shown = lambda v: json.dumps(v)[:80]
  return errors.DataError(f"{name} differs from {first} in {key} ({shown(value)} vs "
                          f"{shown(expected)}); {_rerun(name)} with the same flags")


def _merge_split(split: str, shards, num_records: int):
  """(rows in record order, embeddings, skipped, elapsed) of one split, checked."""
  parts = [_load_part(name, folder, split, manifest["splits"][split])
           for name, folder, manifest in shards]
  indices = np.concatenate([p["indices"] for p in parts]).astype(np.int64)
  skipped = sorted((s["index"], s["image"], s["reason"])
                   for _, _, manifest in shards for s in manifest["splits"][split]["skipped"])
  covered = np.concatenate([indices, np.asarray([s[0] for s in skipped], np.int64)])
  if not np.array_equal(np.sort(covered), np.arange(num_records)):  # shapes differ: False
    raise errors.DataError(
        f"the shards' {split} rows do not cover its {num_records} images exactly once; "
        "rerun the shards with the same flags")
  order = np.argsort(indices, kind="stable")
  feats = np.concatenate([p["embeddings"] for p in parts]).astype(np.float32)[order]
  bad = np.flatnonzero(~np.isfinite(feats).all(axis=1))
  if bad.size:   # checked for every row of every split before anything is written
    raise errors.DataError(f"the shards' {split} embeddings have {bad.size} row(s) with NaN or "
                           f"inf (first: image {indices[order][bad[0]]}); rerun the shards")
  classes = np.concatenate([p["classes"] for p in parts])[order]
  files = np.concatenate([p["files"] for p in parts])[order]
  rows = [_Row(str(c), str(f)) for c, f in zip(classes, files)]
  elapsed = sum(float(manifest["splits"][split]["elapsed_s"]) for _, _, manifest in shards)
  return rows, feats, [(o, r) for _, o, r in skipped], elapsed


def _checked_shards(root: str, num_shards: Optional[int], expected: Optional[dict]):
  """[(name, folder, manifest)] of a complete, consistent set of finished shards."""
  shards = []
  for name in _find_shards(root, num_shards):
    folder = os.path.join(root, name)
    manifest = _read_manifest(folder, name)
    if manifest is None:
      raise errors.DataError(f"{name} is unfinished (no {embeddings_lib.MANIFEST} in {folder}: "
                             f"killed or still running); {_rerun(name)}")
    _check_names(folder, name, manifest)
    _check_files(folder, name, manifest)
    shards.append((name, folder, manifest))
  first_name, _, first = shards[0]
  settings = first["settings"]
  for name, _, manifest in shards:
    if [manifest["shard_index"], manifest["num_shards"]] != [
        int(p) for p in name.split("-")[1::2]]:
      raise errors.DataError(f"{name}: its manifest is of shard {manifest['shard_index']} of "
                             f"{manifest['num_shards']}; {_rerun(name)}")
    for key in sorted(set(settings) | set(manifest["settings"])):
      if manifest["settings"].get(key) != settings.get(key):
        raise _mismatch(name, first_name, key, manifest["settings"].get(key), settings.get(key))
  for key, value in (expected or {}).items():
    if settings.get(key) != value:
      raise errors.DataError(f"the shards under {root} were extracted with {key}="
                             f"{json.dumps(settings.get(key))[:80]}, not "
                             f"{json.dumps(value)[:80]}; give --merge the shards' flags, "
                             "or rerun every shard with these")
  return shards


def merge_shards(out_dir: str, dataset_name: str, crop: str,
                 num_shards: Optional[int] = None, expected: Optional[dict] = None,
                 keep_shards: bool = False, log: Callable[[str], None] = print) -> dict:
  """Checks every shard, writes the split files and the manifest; returns the manifest.

  `expected`: settings the merge command itself gave (e.g. {"sources": [...]}),
  which the shards must share. Nothing is written unless every check passes.
  """
  extract.check_output_names("pkl", dataset_name)
  root = shards_dir(out_dir, dataset_name, crop)
  target_dir = os.path.join(out_dir, dataset_name, crop)
  try:
    shards = _checked_shards(root, num_shards, expected)
    first = shards[0][2]
    settings = first["settings"]
    if settings["mode"] == ALL_MODE:
      extract_files.check_all_target(target_dir)
    merged = {s: _merge_split(s, shards, int(r["num_records"]))
              for s, r in settings["records"].items()}
    tokens = {c: t for t, c in settings["class_names"].items()}
    classes = settings["split_classes"]
    keys = {s: extract.split_keys(s, classes[s], tokens, rows, len(skipped))
            for s, (rows, _, skipped, _) in merged.items() if settings["mode"] == SPLIT_MODE}
    header = extract.manifest_header(dataset_name, crop, settings["format"], first["backbone"],
                                     settings["sources"], settings["split_origin"], {})
  except (KeyError, TypeError, ValueError, AttributeError) as exc:
    raise errors.DataError(f"{root}: a shard manifest is malformed ({type(exc).__name__}: "
                           f"{exc}); rerun the shards") from None
  header["shards"] = {"num_shards": len(shards), "folder": os.path.abspath(root),
                      "kept": bool(keep_shards)}
  with extract.new_generation(target_dir) as staging:   # the shards folder is carried over
    if settings["mode"] == ALL_MODE:
      rows, feats, skipped, elapsed = merged[extract_files.ALL]
      manifest = extract_files.write_all(staging, header, tokens, rows, feats, skipped,
                                         elapsed, log)
    else:
      header["class_names"] = settings["class_names"]
      for split, (_, feats, skipped, elapsed) in merged.items():
        header["splits"][split] = extract.write_split_file(
            staging, split, settings["format"], keys[split], len(classes[split]), feats,
            skipped, elapsed, log)
      manifest = header
      extract.write_manifest(staging, manifest)
  if not keep_shards:
    shutil.rmtree(root)
  return manifest
