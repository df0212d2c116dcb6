"""The data a run was trained on: loading its splits, their sha256 record and checks.

A run's config.json holds `data_record`'s {data_path, sha256 per split};
later commands compare what they load with it (`check_data`).
"""

import hashlib
import os
import sys
from typing import Optional, Sequence

from leo_suite import errors
from leo_suite import safeio
from leo_suite.data import embeddings as embeddings_lib
from leo_suite.data import episodes
from leo_suite.data import synthetic
from leo_suite.data import views as views_lib

RELEASED = ("miniImageNet", "tieredImageNet")
SPLITS = ("train", "val", "test")


def how_to_get(data_path, dataset_name):
  if dataset_name in RELEASED:
    return ("LEO's released embeddings are not bundled: run `python "
            "scripts/download_embeddings.py --dest embeddings` (needs internet; offline, "
            "pass --archive path/to/embeddings.zip), or pass "
            "--data_path=<directory holding miniImageNet/ and tieredImageNet/>. "
            "To try the suite without them use --dataset_name=synthetic.")
  found = sorted(d for d in os.listdir(data_path)
                 if os.path.isdir(os.path.join(data_path, d))) if os.path.isdir(
                     data_path) else []
  return f"datasets found under {data_path}: {found or 'none'}"


def load_splits(settings: dict, data_path: str, names: Sequence[str]):
  """Loads the named splits of the run's dataset (name -> EmbeddingSplit)."""
  dataset, crop = settings["dataset_name"], settings["embedding_crop"]
  if dataset == "tieredImageNet" and crop != "center":
    raise errors.ConfigError(
        "tieredImageNet has only the center crop in LEO's release; use --embedding_crop=center")
  if dataset == synthetic.DATASET_NAME:
    synthetic.ensure(data_path)
  hint = how_to_get(data_path, dataset)
  loaded = {name: embeddings_lib.load_dataset_split(data_path, dataset, crop, name, hint)
            for name in names}
  embeddings_lib.check_compatible(list(loaded.values()))
  return loaded


def train_sampler(settings: dict, data_path: str, split, spec, dtype,
                  saved: Optional[dict] = None, allow_change: bool = False):
  """The meta-training `EpisodeSampler`; with --metatrain_views, one that draws
  each image's views per task from `<split>_views.npz` (`leo_suite.data.views`).
  `saved`: a resumed run's data record, whose views sha256 the file must match
  (as `check_data` does for the splits) unless `allow_change`."""
  views_per_image = settings.get("metatrain_views", 0)   # 0 in runs saved before it
  if not views_per_image:
    return episodes.EpisodeSampler(split, spec, "meta-training", dtype)
  if settings["train_on_val"]:
    raise errors.ConfigError("--metatrain_views reads the train split's views only; it "
                             "cannot be combined with --train_on_val")
  path = views_lib.views_path(data_path, settings["dataset_name"],
                              settings["embedding_crop"], "train")
  views, sha256 = views_lib.load_views(path, split, views_per_image)
  trained_with = (saved or {}).get("sha256", {}).get("train_views")
  if trained_with and trained_with != sha256 and not allow_change:
    raise errors.ConfigError(
        f"{path}: not the views file the run was trained with (its sha256 is "
        f"{sha256[:12]}..., the run's {trained_with[:12]}...). Point --data_path at the "
        "original files, or pass --allow_data_change to proceed knowingly")
  return views_lib.ViewEpisodeSampler(split, spec, views, views_per_image, "meta-training",
                                      dtype)


def split_sha256(split) -> str:
  return next(iter(split.source.values()))


def file_sha256(path) -> Optional[str]:
  if not os.path.exists(path):
    return None
  digest = hashlib.sha256()
  with safeio.open_regular(path, max_bytes=sys.maxsize) as handle:  # any size, read in blocks
    for block in iter(lambda: handle.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def data_record(settings: dict, data_path: str, loaded: dict) -> dict:
  """{data_path, sha256 per split}: hashes of the loaded splits, the others' files."""
  hashes = {}
  for name in SPLITS:
    if name in loaded:
      hashes[name] = split_sha256(loaded[name])
    else:
      hashes[name] = file_sha256(embeddings_lib.split_path(
          data_path, settings["dataset_name"], settings["embedding_crop"], name))
  if settings.get("metatrain_views"):
    hashes["train_views"] = file_sha256(views_lib.views_path(
        data_path, settings["dataset_name"], settings["embedding_crop"], "train"))
  return {"data_path": os.path.abspath(data_path), "sha256": hashes}


def check_data(saved: dict, data_path: str, loaded: dict, allow_change: bool) -> dict:
  """Compares loaded splits with the hashes saved at training.

  Returns what is recorded in results: the path used, and the splits whose
  contents differ (only with allow_change; else a ConfigError).
  """
  changed = [name for name, split in loaded.items()
             if saved["sha256"].get(name) and split_sha256(split) != saved["sha256"][name]]
  if changed and not allow_change:
    details = "; ".join(
        f"{name}: trained with sha256 {saved['sha256'][name][:12]}..., "
        f"{next(iter(loaded[name].source))} has {split_sha256(loaded[name])[:12]}..."
        for name in changed)
    raise errors.ConfigError(
        f"the data differs from the data the run was trained with ({details}). Point "
        f"--data_path at the original files (the run used {saved['data_path']}), or pass "
        "--allow_data_change to proceed knowingly (recorded in the result)")
  return {"data_path": os.path.abspath(data_path),
          "moved": os.path.abspath(data_path) != saved["data_path"],
          "changed_splits": changed,
          "sha256": {name: split_sha256(split) for name, split in loaded.items()}}
