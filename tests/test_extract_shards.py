"""Extraction in shards (scripts/extract_embeddings.py --num_shards/--shard_index/--merge):
the merged files are the single-process ones byte for byte; a missing, unfinished,
changed or foreign shard is refused in one line and nothing is written."""

import json
import os
import pickle
import re

import numpy as np
import pytest
import tensorflow as tf

from leo_suite import errors
from leo_suite import fileio
from leo_suite.data import embeddings as embeddings_lib
from leo_suite.models import backbones
from leo_suite.pretrain import class_splits
from leo_suite.pretrain import classifier as classifier_lib
from leo_suite.pretrain import extract
from leo_suite.pretrain import extract_files
from leo_suite.pretrain import extract_shards
from leo_suite.pretrain import pretrain_config
from tests.test_pretrain_extract import CLASSES
from tests.test_pretrain_extract import image_tree  # pylint: disable=unused-import
from tests.test_predict import _script

QUIET = {"log": lambda _: None}
BATCH = 2   # images per batch: every shard gets some of each split
# The split of test_pretrain_extract.CLASSES as a JSON file for --split (class-path prefixes).
SPLIT = {"train": ["Japanese_(katakana)"], "val": ["Greek"], "test": ["Latin", "Latin-x"]}


@pytest.fixture(scope="module")
def backbone_dirs(tmp_path_factory):
  """Two tiny random Conv-4 backbones (different weights)."""
  root = tmp_path_factory.mktemp("backbones")
  dirs = []
  for seed in (0, 1):
    tf.keras.utils.set_random_seed(seed)
    config = pretrain_config.PretrainConfig(backbone="conv4", image_size=28, channels=1,
                                            invert=True)
    classifier_lib.export_backbone(backbones.build_backbone("conv4", 28, 1), config,
                                   str(root / f"backbone{seed}"))
    dirs.append(str(root / f"backbone{seed}"))
  return dirs


def _split_plan(image_tree, tmp_path):  # pylint: disable=redefined-outer-name
  """(by_class, split_classes, origin, split file) as the CLI's --split loads them."""
  split_file = tmp_path / "split.json"
  split_file.write_text(json.dumps(SPLIT))
  by_class, split_classes, origin = class_splits.load_labelled_splits([image_tree], str(split_file))
  assert {s: sorted(c) for s, c in split_classes.items()} == {
      s: sorted(c) for s, c in CLASSES.items()}
  return by_class, split_classes, origin, str(split_file)


def _shards(backbone_dir, plan, out, num_shards, indices=None, **kwargs):
  kwargs.setdefault("batch_size", BATCH)
  for index in range(num_shards) if indices is None else indices:
    extract_shards.extract_shard(backbone_dir, plan, str(out), "tiny", num_shards, index,
                                 **kwargs, **QUIET)


def _keys_and_rows(path):
  """A split file's keys (list, file order) and embeddings, as stored."""
  if str(path).endswith(".npz"):
    with np.load(path, allow_pickle=False) as data:
      return [str(k) for k in data["keys"]], data["embeddings"]
  data = pickle.loads(path.read_bytes())   # written by this test
  return [str(k) for k in data["keys"]], np.asarray(data["embeddings"])


def _without_run_details(manifest):
  """A manifest without what differs between runs (time, speed, shards, generation id)."""
  manifest = json.loads(json.dumps(manifest))
  assert re.fullmatch(r"[0-9a-f]{32}", manifest["generation"])
  for key in ("created_utc", "shards", "generation"):
    manifest.pop(key, None)
  for entry in manifest["splits"].values():
    entry.pop("images_per_s")
  return manifest


@pytest.mark.parametrize("fmt,batch_size,bad", [("pkl", 2, None),
                                                ("npz", 4, "Latin/character01/d1.png")])
def test_two_shards_merge_into_the_single_process_files(backbone_dirs, image_tree, tmp_path,
                                                        fmt, batch_size, bad):
  if bad:   # skipped: the keys of its class's later images shift
    with open(os.path.join(image_tree, bad), "wb") as handle:
      handle.write(b"\x89PNG\r\n\x1a\n truncated")
  by_class, split_classes, origin, _ = _split_plan(image_tree, tmp_path)
  options = {"fmt": fmt, "skip_bad": bool(bad), "batch_size": batch_size}
  single = extract.extract_embeddings(backbone_dirs[0], by_class, split_classes,
                                      str(tmp_path / "single"), "tiny", sources=[image_tree],
                                      split_origin=origin, **options, **QUIET)
  plan = extract_shards.plan_splits(by_class, split_classes, [image_tree], origin)
  _shards(backbone_dirs[0], plan, tmp_path / "sharded", 2, **options)
  shards_root = extract_shards.shards_dir(str(tmp_path / "sharded"), "tiny", "center")
  assert sorted(os.listdir(shards_root)) == ["shard-00000-of-00002", "shard-00001-of-00002"]
  merged = extract_shards.merge_shards(str(tmp_path / "sharded"), "tiny", "center", **QUIET)
  assert not os.path.exists(shards_root)   # removed after the merge (no keep_shards)
  assert merged["shards"]["num_shards"] == 2
  if bad:  # its split's batches differ after the skip: same keys, embeddings to rounding
    assert [s["image"] for s in merged["splits"]["test"]["skipped"]] == [
        os.path.join(image_tree, bad)]
    for manifest in (merged, single):
      manifest["splits"]["test"].pop("sha256")
  assert _without_run_details(merged) == _without_run_details(single)
  assert merged["generation"] != single["generation"]
  for split in ("train", "val", "test"):
    name = f"{split}_embeddings.{fmt}"
    one = tmp_path / "single" / "tiny" / "center" / name
    two = tmp_path / "sharded" / "tiny" / "center" / name
    (keys_a, rows_a), (keys_b, rows_b) = _keys_and_rows(one), _keys_and_rows(two)
    assert keys_a == keys_b and rows_a.shape == rows_b.shape == (len(keys_a), 64)
    a, b = embeddings_lib.load_split(str(one)), embeddings_lib.load_split(str(two))
    assert (a.class_names, a.image_names) == (b.class_names, b.image_names)
    if bad and split == "test":
      assert len(keys_a) == 5
      np.testing.assert_allclose(rows_a, rows_b, rtol=1e-5, atol=1e-6)
      continue
    assert one.read_bytes() == two.read_bytes(), split
    np.testing.assert_array_equal(rows_a, rows_b)
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
  assert sorted(os.listdir(tmp_path / "sharded" / "tiny" / "center")) == sorted(
      os.listdir(tmp_path / "single" / "tiny" / "center"))


def test_whole_source_shards_merge_into_the_single_process_file(backbone_dirs, image_tree,
                                                               tmp_path):
  records = extract_files.scan_all([image_tree])
  single = extract_files.extract_all(backbone_dirs[0], records, str(tmp_path / "single"),
                                     "tiny", batch_size=4, sources=[image_tree], **QUIET)
  plan = extract_shards.plan_all(records, [image_tree])
  # 15 images in batches of 4: shard i has batch i, shard 4 none.
  _shards(backbone_dirs[0], plan, tmp_path / "sharded", 5, batch_size=4)
  merged = extract_shards.merge_shards(str(tmp_path / "sharded"), "tiny", "center",
                                       keep_shards=True, **QUIET)
  assert _without_run_details(merged) == _without_run_details(single)
  root = extract_shards.shards_dir(str(tmp_path / "sharded"), "tiny", "center")
  assert merged["shards"]["kept"] and os.path.isdir(root)
  with open(os.path.join(root, "shard-00004-of-00005", embeddings_lib.MANIFEST)) as handle:
    assert json.load(handle)["splits"]["all"]["num_images"] == 0
  name = os.path.join("tiny", "center", "all_embeddings.pkl")
  assert (tmp_path / "single" / name).read_bytes() == (tmp_path / "sharded" / name).read_bytes()


def test_finished_shard_is_skipped_and_an_unfinished_one_refused(backbone_dirs, image_tree,
                                                                 tmp_path):
  by_class, split_classes, origin, _ = _split_plan(image_tree, tmp_path)
  plan = extract_shards.plan_splits(by_class, split_classes, [image_tree], origin)
  _shards(backbone_dirs[0], plan, tmp_path, 2)
  folder = os.path.join(extract_shards.shards_dir(str(tmp_path), "tiny", "center"),
                        "shard-00001-of-00002")
  stamps = {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in os.listdir(folder)}
  logged = []
  extract_shards.extract_shard(backbone_dirs[0], plan, str(tmp_path), "tiny", 2, 1,
                               batch_size=BATCH, log=logged.append)
  assert logged == ["shard-00001-of-00002: already complete with these settings; nothing to do"]
  assert stamps == {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in os.listdir(folder)}
  os.remove(os.path.join(folder, embeddings_lib.MANIFEST))   # as a killed run leaves it
  with pytest.raises(errors.DataError, match=r"^shard-00001-of-00002 is unfinished .*; rerun "
                     r"it: --num_shards=2 --shard_index=1$"):
    extract_shards.merge_shards(str(tmp_path), "tiny", "center", **QUIET)
  assert os.listdir(tmp_path / "tiny" / "center") == ["shards"]
  with pytest.raises(errors.DataError, match="--num_shards=2, not 3"):
    extract_shards.merge_shards(str(tmp_path), "tiny", "center", num_shards=3, **QUIET)


def test_merge_checks_every_row_before_replacing_the_previous_generation(
    backbone_dirs, image_tree, tmp_path):
  """A NaN row in the last split's last shard: the previous files stay, byte for byte."""
  by_class, split_classes, origin, _ = _split_plan(image_tree, tmp_path)
  extract.extract_embeddings(backbone_dirs[1], by_class, split_classes, str(tmp_path), "tiny",
                             batch_size=BATCH, split_origin=origin, **QUIET)
  crop_dir = tmp_path / "tiny" / "center"
  before = {n: (crop_dir / n).read_bytes() for n in os.listdir(crop_dir)}
  plan = extract_shards.plan_splits(by_class, split_classes, [image_tree], origin)
  _shards(backbone_dirs[0], plan, tmp_path, 2)
  folder = os.path.join(extract_shards.shards_dir(str(tmp_path), "tiny", "center"),
                        "shard-00001-of-00002")
  path = os.path.join(folder, "test_shard.npz")
  with np.load(path) as data:
    arrays = dict(data)
  arrays["embeddings"][-1, 3] = np.nan
  np.savez(path, **arrays)
  with open(os.path.join(folder, embeddings_lib.MANIFEST)) as handle:
    manifest = json.load(handle)
  manifest["splits"]["test"]["sha256"] = fileio.file_sha256(path)
  with open(os.path.join(folder, embeddings_lib.MANIFEST), "w") as handle:
    json.dump(manifest, handle)
  with pytest.raises(errors.DataError, match=r"shards' test embeddings have 1 row\(s\) with NaN"):
    extract_shards.merge_shards(str(tmp_path), "tiny", "center", **QUIET)
  assert {n: (crop_dir / n).read_bytes() for n in os.listdir(crop_dir) if n != "shards"} == before
  assert sorted(os.listdir(tmp_path / "tiny")) == ["center"]   # no staging folder left
  arrays["embeddings"][-1, 3] = 0.5   # repaired: the merge replaces the whole generation
  np.savez(path, **arrays)
  manifest["splits"]["test"]["sha256"] = fileio.file_sha256(path)
  with open(os.path.join(folder, embeddings_lib.MANIFEST), "w") as handle:
    json.dump(manifest, handle)
  merged = extract_shards.merge_shards(str(tmp_path), "tiny", "center", **QUIET)
  assert sorted(os.listdir(crop_dir)) == sorted(before)
  assert (crop_dir / "train_embeddings.pkl").read_bytes() != before["train_embeddings.pkl"]
  with open(crop_dir / embeddings_lib.MANIFEST) as handle:
    assert json.load(handle)["generation"] == merged["generation"]
  for split in ("train", "val", "test"):
    assert embeddings_lib.load_dataset_split(str(tmp_path), "tiny", "center", split).dim == 64


def test_a_killed_switch_is_undone_and_its_carried_shards_return(tmp_path):
  """Left by kills: center renamed aside, and a staging folder holding the carried shards."""
  (tmp_path / "center.old").mkdir()
  (tmp_path / "center.old" / "manifest.json").write_text("old")
  (tmp_path / "center.tmp-dead" / "shards" / "shard-00000-of-00001").mkdir(parents=True)
  (tmp_path / "center.tmp-dead" / "train_embeddings.pkl").write_bytes(b"half")
  final = str(tmp_path / "center")
  with pytest.raises(RuntimeError):
    with extract.new_generation(final) as staging:
      assert os.path.basename(staging).startswith("center.tmp-")
      (tmp_path / os.path.basename(staging) / "manifest.json").write_text("new")
      raise RuntimeError("killed while writing")
  assert os.listdir(tmp_path) == ["center"]
  assert sorted(os.listdir(final)) == ["manifest.json", "shards"]
  assert (tmp_path / "center" / "manifest.json").read_text() == "old"
  with extract.new_generation(final) as staging:
    (tmp_path / os.path.basename(staging) / "manifest.json").write_text("new")
  assert os.listdir(tmp_path) == ["center"]
  assert os.listdir(tmp_path / "center" / "shards") == ["shard-00000-of-00001"]
  assert (tmp_path / "center" / "manifest.json").read_text() == "new"


@pytest.mark.parametrize("num_shards,shard_index,merge,message", [
    (0, None, False, "--num_shards=0 must be >= 1"),
    (-2, 0, False, "--num_shards=-2 must be >= 1"),
    (2, None, False, "needs --shard_index"),
    (2, 2, False, "--shard_index=2: use 0 to 1"),
    (2, -1, False, "--shard_index=-1: use 0 to 1"),
    (2, 0, True, "drop --shard_index"),
])
def test_wrong_flag_combinations_are_refused(num_shards, shard_index, merge, message):
  with pytest.raises(errors.ConfigError, match=message):
    extract_shards.check_flags(num_shards, shard_index, merge)


def _merge_cli(out, *extra):
  return _script("extract_embeddings.py", "--merge", f"--out={out}", "--dataset_name=tiny",
                 *extra)


def _one_line_error(proc, *fragments):
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error: ")]
  assert len(lines) == 1 and lines[0] == proc.stderr.strip().splitlines()[-1], proc.stderr
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("damage", ["missing", "tampered", "other_backbone", "flags"])
def test_merge_cli_refuses_bad_shards_in_one_line_and_writes_nothing(
    backbone_dirs, image_tree, tmp_path, damage):
  by_class, split_classes, origin, _ = _split_plan(image_tree, tmp_path)
  plan = extract_shards.plan_splits(by_class, split_classes, [image_tree], origin)
  out = tmp_path / "out"
  root = extract_shards.shards_dir(str(out), "tiny", "center")
  _shards(backbone_dirs[0], plan, out, 2, indices=[0])
  _shards(backbone_dirs[damage == "other_backbone"], plan, out, 2,
          indices=[] if damage == "missing" else [1])
  if damage == "tampered":
    path = os.path.join(root, "shard-00001-of-00002", "val_shard.npz")
    with open(path, "r+b") as handle:
      handle.seek(-40, os.SEEK_END)
      handle.write(b"\0" * 8)
  proc = _merge_cli(out, *(["--shard_index=0"] if damage == "flags" else []))
  _one_line_error(proc, *{
      "missing": ["shard 1 of 2 is missing", "--num_shards=2 --shard_index=1"],
      "tampered": ["shard-00001-of-00002", "val_shard.npz does not match the sha256",
                   "--num_shards=2 --shard_index=1"],
      "other_backbone": ["shard-00001-of-00002 was extracted with another backbone",
                         "--shard_index=1 with the same --backbone_dir"],
      "flags": ["--merge", "drop --shard_index"]}[damage])
  assert os.listdir(out / "tiny" / "center") == ["shards"]   # no split file, no manifest
  assert not [n for _, _, files in os.walk(out) for n in files if ".tmp-" in n]


def test_shard_and_merge_clis_complete_a_killed_extraction(backbone_dirs, image_tree, tmp_path):
  """Shard 0 done, shard 1 killed: merge names the rerun; after it, merge matches one run."""
  by_class, split_classes, origin, split_file = _split_plan(image_tree, tmp_path)
  plan = extract_shards.plan_splits(by_class, split_classes, [image_tree], origin)
  out = tmp_path / "out"
  _shards(backbone_dirs[0], plan, out, 2, indices=[0])
  killed = os.path.join(extract_shards.shards_dir(str(out), "tiny", "center"),
                        "shard-00001-of-00002")
  os.makedirs(killed)
  flags = [f"--source={image_tree}", f"--split={split_file}", "--num_shards=2",
           f"--batch_size={BATCH}"]
  _one_line_error(_merge_cli(out, *flags), "shard-00001-of-00002 is unfinished",
                  "rerun it: --num_shards=2 --shard_index=1")
  proc = _script("extract_embeddings.py", f"--backbone_dir={backbone_dirs[0]}", f"--out={out}",
                 "--dataset_name=tiny", *flags, "--shard_index=1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "shard 1 of 2:" in proc.stdout and "--merge" in proc.stdout
  proc = _merge_cli(out, *flags, f"--backbone_dir={backbone_dirs[0]}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "merged 2 shards" in proc.stdout
  extract.extract_embeddings(backbone_dirs[0], by_class, split_classes, str(tmp_path / "one"),
                             "tiny", batch_size=BATCH, sources=[image_tree],
                             split_origin=origin, **QUIET)
  for split in ("train", "val", "test"):
    name = os.path.join("tiny", "center", f"{split}_embeddings.pkl")
    assert (out / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
