"""Per-view embeddings (`<split>_views.npz`) and meta-training on views drawn per task."""

import itertools
import json
import os
import sys

import numpy as np
import pytest

from leo_suite import errors
from leo_suite.data import embedding_keys
from leo_suite.data import embeddings as embeddings_lib
from leo_suite.data import episodes
from leo_suite.data import views as views_lib

from tests import scripts_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_VIEWS, DIM = 4, 6


def _write_dataset(root, seed=0, num_classes=5, per_class=6):
  """A 'tiny' dataset whose train split has a views file (train rows = mean view)."""
  rng = np.random.default_rng(seed)
  folder = os.path.join(root, "tiny", "center")
  for split, count in (("train", num_classes), ("val", 4), ("test", 4)):
    keys = [embedding_keys.make_key(f"{split}{c}", i)
            for c in range(count) for i in range(per_class)]
    views = rng.standard_normal((len(keys), NUM_VIEWS, DIM)).astype(np.float32)
    views += np.repeat(3 * rng.standard_normal((count, 1, DIM)), per_class, axis=0)
    embeddings_lib.write_split(os.path.join(folder, f"{split}_embeddings.pkl"), keys,
                               views.mean(axis=1))
    if split == "train":
      views_lib.write_views(os.path.join(folder, "train_views.npz"), keys, views)
  return folder


@pytest.fixture
def dataset(tmp_path):
  folder = _write_dataset(str(tmp_path))
  split = embeddings_lib.load_dataset_split(str(tmp_path), "tiny", "center", "train")
  return folder, split


def _sampler(split, views, per_image, spec=episodes.EpisodeSpec(3, 1, 2)):
  return views_lib.ViewEpisodeSampler(split, spec, views, per_image)


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_every_view_gives_the_averaged_samplers_tasks(dataset):
  folder, split = dataset
  views, _ = views_lib.load_views(os.path.join(folder, "train_views.npz"), split, NUM_VIEWS)
  spec = episodes.EpisodeSpec(3, 2, 2)
  plain = episodes.EpisodeSampler(split, spec)
  drawn = _sampler(split, views, NUM_VIEWS, spec)
  for index in range(5):
    for a, b in zip(plain.sample_task(7, index), drawn.sample_task(7, index)):
      np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("per_image", [1, 2])
def test_each_image_is_the_mean_of_distinct_views_of_the_drawn_image(dataset, per_image):
  """Rows are unit means of `per_image` distinct views of the image the
  averaged sampler draws there; a task is a function of (seed, index) and the
  views drawn vary across tasks, each view about equally often."""
  folder, split = dataset
  views, _ = views_lib.load_views(os.path.join(folder, "train_views.npz"), split, per_image)
  sampler = _sampler(split, views, per_image)
  subsets = list(itertools.combinations(range(NUM_VIEWS), per_image))
  counts = np.zeros(NUM_VIEWS)
  for index in range(40):
    classes, picks = sampler.draw(3, index)
    rows = sampler.rows(classes, picks).numpy()                         # [N, K+V]
    support_x, _, query_x, _ = sampler.sample_task(3, index)
    x = np.concatenate([support_x.numpy(), query_x.numpy()], axis=1)    # [N, K+V, D]
    for (n, p), row in np.ndenumerate(rows):
      candidates = np.stack([_unit(views[row, list(s)].mean(axis=0)) for s in subsets])
      errors_ = np.abs(candidates - x[n, p]).max(axis=1)
      assert errors_.min() < 1e-5, (index, n, p)
      counts[list(subsets[int(errors_.argmin())])] += 1
    again = sampler.sample_task(3, index)
    np.testing.assert_array_equal(again[0].numpy(), support_x.numpy())
  expected = counts.sum() / NUM_VIEWS
  assert np.all(np.abs(counts - expected) < 0.25 * expected), counts


def test_views_are_read_in_the_splits_row_order_whatever_the_files_order(tmp_path, dataset):
  folder, split = dataset
  raw = np.load(os.path.join(folder, "train_views.npz"))
  order = np.random.default_rng(1).permutation(len(raw["keys"]))
  path = str(tmp_path / "shuffled_views.npz")
  views_lib.write_views(path, raw["keys"][order], raw["embeddings"][order])
  ordered, _ = views_lib.load_views(os.path.join(folder, "train_views.npz"), split, 1)
  shuffled, _ = views_lib.load_views(path, split, 1)
  np.testing.assert_array_equal(ordered, shuffled)
  np.testing.assert_allclose(ordered.mean(axis=1), split.embeddings, rtol=1e-5, atol=1e-6)


def _bad(tmp_path, keys, views, name="bad_views.npz"):
  path = str(tmp_path / name)
  views_lib.write_views(path, keys, views)
  return path


def test_a_views_file_is_checked_before_use(tmp_path, dataset):
  folder, split = dataset
  raw = np.load(os.path.join(folder, "train_views.npz"))
  keys, views = list(raw["keys"]), raw["embeddings"]
  cases = [
      (keys, views[:, :, :DIM - 1], r"shape \(30, 4, 5\), expected \(n, V, 6\)"),
      (keys[:-1], views[:-1], "are not those of"),
      ([k.replace("train0", "train9") for k in keys], views, "are not those of"),
      (keys, views + 0.01, "mean view differs from its row"),
      (keys, np.where(np.arange(30)[:, None, None] == 3, np.nan, views), "image 3's views"),
  ]
  for case_keys, case_views, message in cases:
    with pytest.raises(errors.DataError, match=message):
      views_lib.load_views(_bad(tmp_path, case_keys, case_views), split, 1)
  with pytest.raises(errors.ConfigError, match="--metatrain_views=5 but .* holds 4 views"):
    views_lib.load_views(os.path.join(folder, "train_views.npz"), split, 5)
  with pytest.raises(errors.DataError, match="no such file.*--view_splits=train"):
    views_lib.load_views(str(tmp_path / "missing_views.npz"), split, 1)
  fifo = str(tmp_path / "fifo_views.npz")
  os.mkfifo(fifo)
  with pytest.raises(errors.DataError, match="fifo_views.npz"):
    views_lib.load_views(fifo, split, 1)   # refused without waiting for a writer
  (tmp_path / "junk_views.npz").write_bytes(b"PK\x03\x04 not a zip")
  with pytest.raises(errors.DataError, match="junk_views.npz"):
    views_lib.load_views(str(tmp_path / "junk_views.npz"), split, 1)
  with pytest.raises(errors.ConfigError, match="use 1 to 4"):
    _sampler(split, views, 0)


FLAGS = ["--dataset_name=tiny", "--model=protonet", "--num_classes=3", "--metatrain_batch_size=2",
         "--num_val_examples_per_class=2", "--metavalid_batch_size=4", "--num_val_batches=1",
         "--num_steps_limit=3", "--checkpoint_steps=3", "--jit_compile=false"]


def _runner(data, run_dir, *extra):
  return scripts_run.run([sys.executable, os.path.join(REPO, "runner.py"), f"--data_path={data}",
                          f"--checkpoint_path={run_dir}", *FLAGS, *extra],
                         capture_output=True, text=True, timeout=300, cwd=REPO, check=False)


def test_runner_meta_trains_on_views_and_records_the_file(tmp_path):
  data = str(tmp_path / "data")
  folder = _write_dataset(data)
  proc = _runner(data, str(tmp_path / "run"), "--metatrain_views=2")
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(tmp_path / "run" / "config.json") as handle:
    config = json.load(handle)
  assert config["settings"]["metatrain_views"] == 2
  from leo_suite import fileio  # pylint: disable=g-import-not-at-top
  assert config["data"]["sha256"]["train_views"] == fileio.file_sha256(
      os.path.join(folder, "train_views.npz"))
  # A resumed run checks the views file it was trained with: the same views in
  # another order per image (the same means, another file) are refused.
  raw = np.load(os.path.join(folder, "train_views.npz"))
  views_lib.write_views(os.path.join(folder, "train_views.npz"), raw["keys"],
                        raw["embeddings"][:, ::-1])
  proc = _runner(data, str(tmp_path / "run"), "--metatrain_views=2", "--num_steps_limit=4")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert "not the views file the run was trained with" in proc.stderr.strip().splitlines()[-1]
  proc = _runner(data, str(tmp_path / "run"), "--metatrain_views=2", "--num_steps_limit=4",
                 "--allow_data_change")
  assert proc.returncode == 0, proc.stderr[-2000:]
  # Refused before anything is written: no views file, or views with --train_on_val.
  os.remove(os.path.join(folder, "train_views.npz"))
  proc = _runner(data, str(tmp_path / "refused"), "--metatrain_views=2")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert "train_views.npz: no such file" in proc.stderr.strip().splitlines()[-1]
  assert not (tmp_path / "refused").exists()
  _write_dataset(data)
  proc = _runner(data, str(tmp_path / "refused"), "--metatrain_views=2", "--train_on_val")
  assert proc.returncode == 2 and "cannot be combined with --train_on_val" in proc.stderr
  assert not (tmp_path / "refused").exists()
  proc = _runner(data, str(tmp_path / "refused"), "--metatrain_views=-1")
  assert proc.returncode == 2 and "--metatrain_views=-1: must be >= 0" in proc.stderr

