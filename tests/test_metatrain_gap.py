"""Issue 31's measurement and option: how hard meta-training's episodes are
(nearest class mean per split, learners' train vs val accuracy from the run's
summaries) and the held-out meta-training classes."""

import json

import numpy as np
import pytest
import tensorflow as tf

from leo_suite import errors
from leo_suite.data import embeddings
from leo_suite.pipelines import gap
from leo_suite.pipelines import omniglot
from leo_suite.pretrain import class_splits
from leo_suite.training import compare
from leo_suite.training import layout


def _split(spread, num_classes=8, per_class=20, dim=16, seed=0):
  """Class means on the unit sphere plus Gaussian noise of `spread`."""
  rng = np.random.default_rng(seed)
  means = rng.normal(size=[num_classes, dim])
  means /= np.linalg.norm(means, axis=1, keepdims=True)
  labels = np.repeat(np.arange(num_classes), per_class)
  return embeddings.split_from_labels(means[labels] + spread * rng.normal(
      size=[len(labels), dim]), labels)


def test_nearest_class_mean_by_split_sees_the_easier_split():
  """A split with tight classes (like the classes the backbone was trained on)
  scores higher than one with wide classes, on the same seeded episodes."""
  splits = {"train": _split(0.05), "val": _split(0.6, seed=1), "test": _split(0.6, seed=2)}
  rows = gap.ncm_by_split(splits, ((5, 1),), num_episodes=40, seed=0)
  by = {r["split"]: r for r in rows}
  assert set(by) == {"train", "val", "test"} and by["train"]["num_tasks"] == 40
  assert by["train"]["accuracy"] == 100.0
  assert by["val"]["accuracy"] + by["val"]["ci95"] < 95.0
  assert by["train"]["accuracy"] - by["train"]["ci95"] > by["val"]["accuracy"] + by["val"]["ci95"]
  table = gap.ncm_table(rows, ((5, 1),))
  assert "| ncm_cosine, meta-train episodes | 100.00 ± 0.00 |" in table
  assert table.count("\n") == 4  # header, rule, three splits


def test_train_val_gap_reads_the_runs_summaries(tmp_path):
  run_dir = str(tmp_path / "run")
  writer = tf.summary.create_file_writer(layout.RunDirectory(run_dir).summaries_dir)
  with writer.as_default():
    for step, value in ((0, 0.50), (10, 0.60), (20, 0.65)):
      tf.summary.scalar("valid/accuracy", value, step=step)
    for step, value in ((10, 0.90), (20, 0.99)):
      tf.summary.scalar("train/accuracy", value, step=step)
  writer.close()
  assert compare.scalars(run_dir, "valid/accuracy") == [(0, 0.5), (10, pytest.approx(0.6)),
                                                        (20, pytest.approx(0.65))]
  result = compare.train_val_gap(run_dir, best_step=20)
  assert result == pytest.approx({"train_accuracy_first": 90.0, "train_accuracy_chosen": 99.0,
                                  "val_accuracy_step0": 50.0, "val_accuracy_chosen": 65.0})
  # The initialisation chosen: meta-train accuracy of the first window.
  assert compare.train_val_gap(run_dir, best_step=0)["train_accuracy_chosen"] == pytest.approx(
      90.0)
  row = {"method": "maml (runner.py)", "model": "maml", "setting": "5w1s", "best_step": 20,
         "gap": result}
  table = gap.learner_table([row, {"method": "ncm_cosine (x)", "setting": "5w1s"}])
  assert "| maml | 5w1s | 90.00 | 99.00 | 50.00 | 65.00 | 20 |" in table
  assert table.count("\n") == 2
  assert compare.train_val_gap(str(tmp_path / "empty"), best_step=0) == {}


def test_hold_out_is_a_seeded_disjoint_partition_in_order():
  classes = [f"alphabet/character{i:02d}" for i in range(40)]
  kept, held = class_splits.hold_out(classes, 0.25, seed=3, min_classes=5)
  assert len(held) == 10 and len(kept) == 30
  assert sorted(kept + held) == classes and not set(kept) & set(held)
  assert kept == sorted(kept) and held == sorted(held)        # the classes' order kept
  assert class_splits.hold_out(classes, 0.25, seed=3, min_classes=5) == (kept, held)
  assert class_splits.hold_out(classes, 0.25, seed=4, min_classes=5)[1] != held


@pytest.mark.parametrize("fraction, min_classes, message", [
    (0.0, 1, r"fraction in \(0, 1\)"), (1.0, 1, r"fraction in \(0, 1\)"),
    (0.1, 20, "holds out 4 of 40 classes"), (0.9, 5, "holds out 36 of 40 classes")])
def test_hold_out_refuses_what_cannot_make_episodes(fraction, min_classes, message):
  with pytest.raises(errors.ConfigError, match=message):
    class_splits.hold_out([str(i) for i in range(40)], fraction, 0, min_classes)


def test_extracted_embeddings_are_reused_only_with_the_same_rotated_and_view_splits(tmp_path):
  """The pipeline re-extracts when --metatrain_rotations or --metatrain_views
  changes, not only when the backbone does."""
  folder = tmp_path / omniglot.DATASET / "warps"
  folder.mkdir(parents=True)
  splits = {}
  for split in ("train", "val", "test"):
    (folder / f"{split}_embeddings.pkl").write_bytes(b"x")
    splits[split] = {"file": f"{split}_embeddings.pkl", "sha256": "0"}
  summary = {"export": {"weights_sha256": "abc"}}
  manifest = {"backbone": {"checkpoint_sha256": "abc"}, "splits": splits}
  (folder / "manifest.json").write_text(json.dumps(manifest))
  assert omniglot.extracted_manifest(str(tmp_path), "warps", summary) == manifest
  assert omniglot.extracted_manifest(str(tmp_path), "warps", summary, ["train"]) is None
  rotated = dict(manifest, rotated_splits=["train"])
  (folder / "manifest.json").write_text(json.dumps(rotated))
  assert omniglot.extracted_manifest(str(tmp_path), "warps", summary, ["train"]) == rotated
  assert omniglot.extracted_manifest(str(tmp_path), "warps", summary) is None
  assert omniglot.extracted_manifest(str(tmp_path), "warps", {"export": {
      "weights_sha256": "other"}}, ["train"]) is None
  # and when --metatrain_views turns the views file on or off.
  assert omniglot.extracted_manifest(str(tmp_path), "warps", summary, ["train"], ["train"]) is None
  viewed = dict(rotated, views={"train": {"file": "train_views.npz", "num_views": 16}})
  (folder / "manifest.json").write_text(json.dumps(viewed))
  assert omniglot.extracted_manifest(str(tmp_path), "warps", summary, ["train"],
                                     ["train"]) is None    # the views file is missing
  (folder / "train_views.npz").write_bytes(b"x")
  assert omniglot.extracted_manifest(str(tmp_path), "warps", summary, ["train"],
                                     ["train"]) == viewed
  assert omniglot.extracted_manifest(str(tmp_path), "warps", summary, ["train"]) is None
