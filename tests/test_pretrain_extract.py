"""Pretraining, extraction and the few-shot baselines (leo_suite/pretrain)."""

import io
import json
import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from leo_suite import errors
from leo_suite import fileio
from leo_suite.data import embedding_keys
from leo_suite.data import embeddings as embeddings_lib
from leo_suite.data import episodes
from leo_suite.data import image_sources
from leo_suite.data import image_views
from leo_suite.data import images as images_lib
from leo_suite.data import views as views_lib
from leo_suite.models import backbones
from leo_suite.models import base
from leo_suite.pretrain import baselines
from leo_suite.pretrain import classifier as classifier_lib
from leo_suite.pretrain import extract
from leo_suite.pretrain import pretrain_config
from leo_suite.pretrain import train as train_lib

from tests import scripts_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- baselines ----------------------------------------------------------------
def _normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_ncm_cosine_matches_numpy():
  rng = np.random.default_rng(0)
  support = rng.normal(size=(3, 4, 2, 6)).astype(np.float32)
  query = rng.normal(size=(3, 4, 5, 6)).astype(np.float32)
  means = _normalize(_normalize(support).mean(axis=2))
  expected = np.einsum("bnvd,bmd->bnvm", _normalize(query), means)
  np.testing.assert_allclose(baselines.ncm_cosine_logits(support, query), expected,
                             rtol=1e-5, atol=1e-6)


def test_logistic_regression_reaches_the_regularised_optimum():
  rng = np.random.default_rng(1)
  support = (rng.normal(size=(4, 5, 3, 16)) + rng.normal(size=(4, 5, 1, 16))).astype(np.float32)
  c = 1.0
  weights, bias = baselines.fit_logistic_regression(support, c, 200)
  x = _normalize(support).reshape(4, 15, 16)
  y = np.tile(np.repeat(np.eye(5), 3, axis=0)[None], [4, 1, 1])
  logits = np.einsum("bid,bdn->bin", x, weights.numpy()) + bias.numpy()[:, None]
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  # Stationarity of sum CE + ||W||^2 / (2C):  W = C X^T (Y - P),  sum_i (P - Y) = 0.
  np.testing.assert_allclose(weights, c * np.einsum("bid,bin->bdn", x, y - p), atol=2e-4)
  np.testing.assert_allclose((p - y).sum(axis=1), 0.0, atol=2e-4)
  # And the objective is lower than at nearby perturbed points.
  x_t, y_t = tf.constant(x), tf.constant(y, tf.float32)
  best = baselines.logistic_objective(weights, bias, x_t, y_t, 1.0 / c).numpy()
  for scale in (1e-2, 1e-1):
    noise = rng.normal(size=weights.shape).astype(np.float32) * scale
    assert (baselines.logistic_objective(weights + noise, bias, x_t, y_t, 1.0 / c).numpy()
            > best).all()


def test_evaluate_reports_mean_and_ci95_on_the_runners_episodes():
  rng = np.random.default_rng(2)
  centres = rng.normal(size=(10, 8)) * 5
  labels = np.repeat(np.arange(10), 20)
  features = centres[labels] + rng.normal(size=(200, 8)) * 0.01
  split = embeddings_lib.split_from_labels(features, labels)
  for name in baselines.BASELINES:
    result = baselines.evaluate(name, split, 5, 1, 15, 40, seed=3)
    assert result == {"accuracy": 100.0, "ci95": 0.0, "num_tasks": 40}, name
  noise = embeddings_lib.split_from_labels(rng.normal(size=(200, 8)), labels)
  result = baselines.evaluate("ncm_cosine", noise, 5, 1, 15, 300, seed=3, chunk=64)
  # The same tasks, drawn by the sampler the runner evaluates learners on.
  sampler = episodes.EpisodeSampler(noise, episodes.EpisodeSpec(5, 1, 15))
  acc = np.concatenate([base.accuracy(baselines.ncm_cosine_logits(e.support_x, e.query_x),
                                      e.query_y).numpy() for e in sampler.fixed_set(3, 300, 100)])
  assert result["accuracy"] == pytest.approx(100 * acc.mean(), abs=1e-4)
  assert result["ci95"] == pytest.approx(100 * 1.96 * acc.std() / np.sqrt(300), abs=1e-4)
  assert abs(result["accuracy"] - 20.0) < 3 * result["ci95"] + 1  # chance on noise


# -- training ------------------------------------------------------------------
def test_rotations_become_new_classes():
  images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28, 1)
  x, y = image_views.rotated_copies(images, np.array([0, 1]))
  np.testing.assert_array_equal(y, [0, 4, 1, 5, 2, 6, 3, 7])
  np.testing.assert_array_equal(x[5], np.rot90(images[1], 2))


def test_shift_augmentation_is_an_integer_translation_and_stateless():
  rng = np.random.default_rng(0)
  x = np.zeros([6, 28, 28, 1], np.float32)
  x[:, 8:20, 8:20] = rng.random([6, 12, 12, 1])
  seed = tf.constant([3, 4])
  out = image_views.augment_batch(tf.constant(x), seed, "shift", 2).numpy()
  np.testing.assert_array_equal(out, image_views.augment_batch(tf.constant(x), seed, "shift", 2))
  shifts = set()
  for original, moved in zip(x, out):
    found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
             if np.allclose(np.roll(original, (dy, dx), axis=(0, 1)), moved, atol=1e-5)]
    assert found, "output is not a translation of the input by <= 2 px"
    shifts.add(found[0])
  assert len(shifts) > 1


def test_affine_augmentation_is_stateless_mild_and_varied():
  x = np.zeros([32, 28, 28, 1], np.float32)
  x[:, 10:18, 12:16] = 1.0
  seed = tf.constant([5, 6])
  out = image_views.augment_batch(tf.constant(x), seed, "affine", 2).numpy()
  np.testing.assert_array_equal(out, image_views.augment_batch(tf.constant(x), seed, "affine", 2))
  assert out.shape == x.shape and out.min() >= 0.0 and out.max() <= 1.0 + 1e-6
  mass = out.sum(axis=(1, 2, 3)) / x[0].sum()   # scale in [0.8, 1.2]^2, shear keeps area
  assert np.all(mass > 0.6) and np.all(mass < 1.5)
  changed = [not np.allclose(o, x[0]) for o in out]
  assert 0 < sum(changed) <= 32 and sum(changed) > 20  # each component on with p = 0.5


def test_cosine_head_logits_are_scaled_cosines():
  config = pretrain_config.PretrainConfig(head="cosine")
  _, classifier = classifier_lib.build_classifier(config, 7)
  logits = classifier(np.random.default_rng(0).random([3, 28, 28, 1]).astype(np.float32)).numpy()
  assert logits.shape == (3, 7) and np.all(np.abs(logits) <= 10.0 + 1e-4)
  with pytest.raises(errors.ConfigError, match="--head"):
    pretrain_config.validate_config(pretrain_config.PretrainConfig(head="arc"))


def _blob_images(num_per_class=10, size=28, seed=0):
  """4 classes: a bright square in a class-specific quadrant (uint8, strokes dark)."""
  rng = np.random.default_rng(seed)
  images, labels = [], []
  for label in range(4):
    for _ in range(num_per_class):
      image = np.full([size, size, 1], 255, np.uint8)
      y0, x0 = 3 + 12 * (label // 2) + rng.integers(0, 3), 3 + 12 * (label % 2) + rng.integers(0, 3)
      image[y0:y0 + 8, x0:x0 + 8] = rng.integers(0, 60)
      images.append(image)
      labels.append(label)
  return np.stack(images), np.asarray(labels)


_TINY = pretrain_config.PretrainConfig(rotations=False, epochs=3, batch_size=8, learning_rate=0.05,
                                       log_every=2)


def _weights(trainer):
  return [v.numpy().copy() for v in trainer.classifier.weights]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """An uninterrupted tiny run, and the same run killed mid-epoch then resumed."""
  images, labels = _blob_images()
  straight_dir = str(tmp_path_factory.mktemp("straight"))
  keras.backend.clear_session()
  straight = train_lib.Pretrainer(_TINY, images, labels, straight_dir, log=lambda _: None)
  summary = straight.train()
  resumed_dir = str(tmp_path_factory.mktemp("resumed"))
  keras.backend.clear_session()
  first = train_lib.Pretrainer(_TINY, images, labels, resumed_dir, log=lambda _: None)
  partial = first.train(stop_after_steps=7)   # "killed" inside epoch 2
  keras.backend.clear_session()
  second = train_lib.Pretrainer(_TINY, images, labels, resumed_dir, log=lambda _: None)
  resumed = second.train()
  return {"straight": straight, "summary": summary, "partial": partial,
          "second": second, "resumed": resumed, "dir": straight_dir,
          "images": images, "labels": labels}


def test_training_learns_and_exports(trained):
  history = trained["summary"]["history"]
  assert [h["epoch"] for h in history] == [1, 2, 3]
  assert history[-1]["loss"] < history[0]["loss"]
  assert history[-1]["accuracy"] > 0.6
  export = trained["summary"]["export"]
  weights = os.path.join(trained["dir"], "backbone", backbones.BACKBONE_WEIGHTS)
  assert export["weights_sha256"] == fileio.file_sha256(weights)
  # TensorBoard event file with scalar summaries (scalars plugin).
  from tensorflow.core.util import event_pb2  # pylint: disable=import-outside-toplevel
  logs = os.path.join(trained["dir"], "logs")
  tags = set()
  for name in os.listdir(logs):
    for record in tf.data.TFRecordDataset(os.path.join(logs, name)):
      for value in event_pb2.Event.FromString(record.numpy()).summary.value:
        assert value.metadata.plugin_data.plugin_name == "scalars"
        tags.add(value.tag)
  assert {"train/loss", "train/accuracy", "train/learning_rate", "epoch/loss"} <= tags


def test_resume_after_kill_replays_the_uninterrupted_run(trained):
  assert trained["partial"]["steps"] == 7 and not trained["partial"]["finished"]
  assert "export" not in trained["partial"]
  assert trained["resumed"]["finished"] and trained["resumed"]["steps"] == 15
  straight, second = trained["straight"], trained["second"]
  assert int(second.optimizer.iterations.numpy()) == int(straight.optimizer.iterations.numpy()) == 15
  for a, b in zip(_weights(straight), _weights(second)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for a, b in zip(straight.optimizer.variables, second.optimizer.variables):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_resume_with_different_settings_is_refused(trained, tmp_path):
  keras.backend.clear_session()
  changed = pretrain_config.PretrainConfig(**{**_TINY.__dict__, "learning_rate": 0.5})
  with pytest.raises(errors.ConfigError, match="learning_rate=0.05"):
    train_lib.Pretrainer(changed, trained["images"], trained["labels"],
                         os.path.dirname(trained["second"].manager.directory),
                         log=lambda _: None).restore()


def test_resume_on_other_data_is_refused(trained, tmp_path):
  keras.backend.clear_session()
  run_dir = os.path.dirname(trained["second"].manager.directory)
  before = trained["second"].num_images
  after = before - 4 * (before // len(trained["labels"]))  # 4 fewer images (x rotations)
  with pytest.raises(errors.ConfigError,
                     match=rf"other data \(num_images {before} then, {after} now\)"):
    train_lib.Pretrainer(_TINY, trained["images"][:-4], trained["labels"][:-4], run_dir,
                         log=lambda _: None).restore()


def test_distillation_loss_is_the_temperature_scaled_kl_and_its_gradient():
  rng = np.random.default_rng(3)
  student, teacher = rng.normal(size=[4, 6]) * 3, rng.normal(size=[4, 6]) * 3
  t = 4.0
  softmax = lambda z: np.exp(z - z.max(-1, keepdims=True)) / np.exp(
      z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)
  p_t, p_s = softmax(teacher / t), softmax(student / t)
  expected = t * t * np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), -1))
  s = tf.Variable(student, dtype=tf.float32)
  with tf.GradientTape() as tape:
    loss = classifier_lib.distillation_loss(s, tf.constant(teacher, tf.float32), t)
  np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5)
  # d/ds T^2 KL = T (softmax(s/T) - softmax(t/T)) / batch (Hinton et al. 2015, eq. 2)
  np.testing.assert_allclose(tape.gradient(loss, s).numpy(), t * (p_s - p_t) / 4, atol=1e-6)
  assert abs(float(classifier_lib.distillation_loss(s, s, t))) < 1e-6


def test_born_again_student(trained, tmp_path):
  """alpha = 0 replays the teacher-free run exactly; at alpha = 1 the student
  learns what the teacher answers, not the labels; the export names the teacher."""
  images, labels = trained["images"], trained["labels"]
  keras.backend.clear_session()
  zero = train_lib.Pretrainer(
      pretrain_config.PretrainConfig(**{**_TINY.__dict__, "teacher": trained["dir"],
                                        "distill_alpha": 0.0}),
      images, labels, str(tmp_path / "zero"), log=lambda _: None)
  zero.train()
  for a, b in zip(_weights(trained["straight"]), _weights(zero)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # A teacher trained on shifted labels (y + 1 mod 4): a pure-distillation
  # student trained on the true labels must answer like the teacher.
  keras.backend.clear_session()
  liar = str(tmp_path / "liar")
  train_lib.Pretrainer(_TINY, images, (labels + 1) % 4, liar, log=lambda _: None).train()
  keras.backend.clear_session()
  soft = train_lib.Pretrainer(
      pretrain_config.PretrainConfig(**{**_TINY.__dict__, "epochs": 8, "teacher": liar,
                                        "distill_alpha": 1.0, "distill_temperature": 1.0}),
      images, labels, str(tmp_path / "soft"), log=lambda _: None)
  summary = soft.train()
  x = image_views.preprocess(images, True)
  teacher_answer = np.argmax(soft.teacher(x, training=False), -1)
  # Batch statistics: 40 steps leave the moving averages behind the weights.
  student_answer = np.argmax(soft.classifier(x, training=True), -1)
  assert np.mean(teacher_answer == (labels + 1) % 4) >= 0.9
  assert np.mean(student_answer == teacher_answer) >= 0.9
  assert np.mean(student_answer == labels) <= 0.1
  teacher = summary["export"]["teacher"]
  latest = tf.train.latest_checkpoint(os.path.join(liar, "checkpoints"))
  assert teacher["checkpoint"] == os.path.basename(latest)
  assert teacher["checkpoint_sha256"] == fileio.file_sha256(latest + ".index")
  with open(tmp_path / "soft" / "backbone" / backbones.BACKBONE_CONFIG) as handle:
    assert json.load(handle)["teacher"]["run_dir"] == os.path.abspath(liar)


def test_a_bad_teacher_is_a_clear_error(trained, tmp_path):
  images, labels = trained["images"], trained["labels"]
  keras.backend.clear_session()
  unfinished = str(tmp_path / "unfinished")
  train_lib.Pretrainer(_TINY, images, labels, unfinished, log=lambda _: None).train(
      stop_after_steps=3)
  cases = [(str(tmp_path / "nothing"), _TINY, "no pretraining checkpoints"),
           (unfinished, _TINY, "stopped at step 3 of 15"),
           (trained["dir"], pretrain_config.PretrainConfig(**{**_TINY.__dict__, "rotations": True}),
            "classifies 4 classes, this run 16")]
  for teacher, config, message in cases:
    keras.backend.clear_session()
    with pytest.raises(errors.ConfigError, match=message):
      train_lib.Pretrainer(
          pretrain_config.PretrainConfig(**{**config.__dict__, "teacher": teacher}),
          images, labels, str(tmp_path / "student"), log=lambda _: None)
  with pytest.raises(errors.ConfigError, match="--distill_alpha=1.5"):
    pretrain_config.validate_config(pretrain_config.PretrainConfig(distill_alpha=1.5))


def test_exported_backbone_round_trips_and_detects_tampering(trained, tmp_path):
  model, description = backbones.load_backbone(os.path.join(trained["dir"], "backbone"))
  x = image_views.preprocess(trained["images"][:5], True)
  np.testing.assert_allclose(model(x, training=False), trained["straight"].backbone(x, training=False),
                             rtol=1e-5, atol=1e-6)
  assert description["feature_dim"] == 64 and description["invert"] is True
  copy = tmp_path / "backbone"
  copy.mkdir()
  for name in (backbones.BACKBONE_WEIGHTS, backbones.BACKBONE_CONFIG):
    with open(os.path.join(trained["dir"], "backbone", name), "rb") as handle:
      (copy / name).write_bytes(handle.read())
  with open(copy / backbones.BACKBONE_WEIGHTS, "ab") as handle:
    handle.write(b"junk")
  with pytest.raises(errors.DataError, match="does not match"):
    backbones.load_backbone(str(copy))
  with pytest.raises(errors.DataError, match="no such file"):
    backbones.load_backbone(str(tmp_path / "nothing"))


def test_bad_config_is_a_clear_error():
  images, labels = _blob_images(2)
  with pytest.raises(errors.ConfigError, match="--schedule='linear'"):
    train_lib.Pretrainer(pretrain_config.PretrainConfig(schedule="linear"), images, labels,
                         "/tmp/x")
  if tf.config.list_physical_devices("GPU"):
    return  # mixed precision is allowed there
  with pytest.raises(errors.ConfigError, match="--mixed_precision=on needs a GPU"):
    train_lib.Pretrainer(pretrain_config.PretrainConfig(mixed_precision="on", batch_size=4,
                                                        rotations=False),
                         images, labels, "/tmp/x")


# -- extraction ----------------------------------------------------------------
CLASSES = {"train": ["Japanese_(katakana)/character01", "Japanese_(katakana)/character02"],
           "val": ["Greek/character01"], "test": ["Latin/character01", "Latin-x/character01"]}


def _png(seed, size=105):
  rng = np.random.default_rng(seed)
  image = np.full([size, size], 255, np.uint8)
  y, x = rng.integers(10, 60, 2)
  image[y:y + 30, x:x + 8] = 0
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


@pytest.fixture()
def image_tree(tmp_path):
  root = tmp_path / "images"
  seed = 0
  for classes in CLASSES.values():
    for name in classes:
      (root / name).mkdir(parents=True)
      for i in range(3):
        (root / name / f"d{i}.png").write_bytes(_png(seed))
        seed += 1
  return str(root)


def _extract(trained, image_tree, out, **kwargs):
  by_class = image_sources.group_by_class(image_sources.scan_directory(image_tree))
  return extract.extract_embeddings(os.path.join(trained["dir"], "backbone"), by_class,
                                    CLASSES, str(out), "tiny", log=lambda _: None, **kwargs)


def test_center_extraction_writes_what_the_runner_reads(trained, image_tree, tmp_path):
  manifest = _extract(trained, image_tree, tmp_path / "out", batch_size=4)
  folder = tmp_path / "out" / "tiny" / "center"
  assert sorted(os.listdir(folder)) == ["manifest.json", "test_embeddings.pkl",
                                        "train_embeddings.pkl", "val_embeddings.pkl"]
  on_disk = json.loads((folder / "manifest.json").read_text())
  assert on_disk == json.loads(json.dumps(manifest))
  assert manifest["backbone"]["checkpoint_sha256"] == fileio.file_sha256(
      os.path.join(trained["dir"], "backbone", backbones.BACKBONE_WEIGHTS))
  assert {k: (v["num_images"], v["num_classes"]) for k, v in manifest["splits"].items()} == {
      "train": (6, 2), "val": (3, 1), "test": (6, 2)}
  assert sorted(manifest["class_names"].values()) == sorted(sum(CLASSES.values(), []))
  tokens = manifest["class_names"]
  model, _ = backbones.load_backbone(os.path.join(trained["dir"], "backbone"))
  for split in ("train", "val", "test"):
    loaded = embeddings_lib.load_dataset_split(str(tmp_path / "out"), "tiny", "center", split)
    assert loaded.embeddings.dtype == np.float32 and loaded.dim == 64
    assert sorted(tokens[c] for c in loaded.class_names) == sorted(CLASSES[split])
    # Row = backbone(preprocess(decoded image)), in file order within each class.
    for c_index, token in enumerate(loaded.class_names):
      expected = model(image_views.preprocess(_decoded(image_tree, tokens[token]), True),
                       training=False).numpy()
      start = loaded.class_start[c_index]
      np.testing.assert_allclose(loaded.embeddings[start:start + 3], expected, rtol=1e-4,
                                 atol=1e-5)


def _decoded(image_tree, class_name):
  """A class folder's images decoded at 28 x 28, in file order."""
  paths = sorted(os.listdir(os.path.join(image_tree, class_name)))
  return np.stack([
      images_lib.decode_image(open(os.path.join(image_tree, class_name, p), "rb").read(),
                              p, images_lib.DecodeOptions(28, 1)) for p in paths])


def test_rotated_splits_add_each_quarter_turn_as_a_class(trained, image_tree, tmp_path):
  """--rotated_splits=train: the train file holds each class upright and turned
  by 90, 180 and 270 degrees (np.rot90 of the decoded images), each turn a
  class of its own; the other splits are as without it."""
  manifest = _extract(trained, image_tree, tmp_path / "out", rotated_splits=["train"])
  assert manifest["rotated_splits"] == ["train"]
  assert {k: (v["num_images"], v["num_classes"]) for k, v in manifest["splits"].items()} == {
      "train": (24, 8), "val": (3, 1), "test": (6, 2)}
  tokens = manifest["class_names"]
  loaded = embeddings_lib.load_dataset_split(str(tmp_path / "out"), "tiny", "center", "train")
  assert sorted(tokens[t] for t in loaded.class_names) == sorted(
      c + turn for c in CLASSES["train"] for turn in ("", "@rot90", "@rot180", "@rot270"))
  model, _ = backbones.load_backbone(os.path.join(trained["dir"], "backbone"))
  upright = {}
  for c_index, token in enumerate(loaded.class_names):
    name, _, degrees = tokens[token].partition("@rot")
    images = np.rot90(_decoded(image_tree, name), int(degrees or 0) // 90, axes=(1, 2))
    expected = model(image_views.preprocess(images, True), training=False).numpy()
    start = loaded.class_start[c_index]
    rows = loaded.embeddings[start:start + 3]
    np.testing.assert_allclose(rows, expected, rtol=1e-4, atol=1e-5)
    upright.setdefault(name, rows)
    if degrees:
      assert np.abs(rows - upright[name]).max() > 1e-3  # a turn is another image
  test = embeddings_lib.load_dataset_split(str(tmp_path / "out"), "tiny", "center", "test")
  assert test.num_classes == 2
  with pytest.raises(errors.ConfigError, match="rotated_splits"):
    _extract(trained, image_tree, tmp_path / "bad", rotated_splits=["nope"])
  assert not os.path.exists(tmp_path / "bad" / "tiny")


def test_view_splits_write_each_warps_view_whose_mean_is_the_row(trained, image_tree, tmp_path):
  """--view_splits=train (with --rotated_splits=train): train_views.npz holds
  the backbone on each of the 16 warps views of each (turned) image, in the
  split file's key order; their mean is the split's row, which is the row
  an extraction without views writes; the manifest lists the file."""
  out = tmp_path / "out"
  manifest = _extract(trained, image_tree, out, crop="warps", rotated_splits=["train"],
                      view_splits=["train"])
  plain = _extract(trained, image_tree, tmp_path / "plain", crop="warps",
                   rotated_splits=["train"])
  folder = out / "tiny" / "warps"
  entry = manifest["views"]["train"]
  assert entry["file"] == "train_views.npz" and entry["num_views"] == image_views.WARP_VIEWS
  assert entry["sha256"] == fileio.file_sha256(str(folder / "train_views.npz"))
  assert sorted(manifest["views"]) == ["train"] and "views" not in plain
  split = embeddings_lib.load_dataset_split(str(out), "tiny", "warps", "train")
  same = embeddings_lib.load_dataset_split(str(tmp_path / "plain"), "tiny", "warps", "train")
  np.testing.assert_array_equal(split.embeddings, same.embeddings)
  per_view, _ = views_lib.load_views(str(folder / "train_views.npz"), split, 16)
  assert per_view.shape == (24, image_views.WARP_VIEWS, split.dim)
  np.testing.assert_allclose(per_view.mean(axis=1), split.embeddings, rtol=1e-5, atol=1e-6)
  # Row r of class c: the backbone on the warps views of that very image.
  model, _ = backbones.load_backbone(os.path.join(trained["dir"], "backbone"))
  tokens = manifest["class_names"]
  for c_index in (0, split.num_classes - 1):
    name, _, degrees = tokens[split.class_names[c_index]].partition("@rot")
    images = np.rot90(_decoded(image_tree, name), int(degrees or 0) // 90, axes=(1, 2))
    x = image_views.warp_views(image_views.preprocess(np.ascontiguousarray(images), True))
    expected = model(x, training=False).numpy().reshape(3, image_views.WARP_VIEWS, -1)
    start = split.class_start[c_index]
    np.testing.assert_allclose(per_view[start:start + 3], expected, rtol=1e-4, atol=1e-5)
  assert np.abs(per_view[:, 0] - per_view[:, 1]).max() > 1e-3   # views differ
  for name in ("val", "test"):
    assert not (folder / f"{name}_views.npz").exists()
  with pytest.raises(errors.ConfigError, match="view_splits"):
    _extract(trained, image_tree, tmp_path / "bad", view_splits=["nope"])
  assert not os.path.exists(tmp_path / "bad" / "tiny")


def test_multiview_npz_averages_ten_views_and_replaces_stale_pickles(trained, image_tree,
                                                                     tmp_path):
  out = tmp_path / "out"
  _extract(trained, image_tree, out, crop="multiview", fmt="pkl")
  manifest = _extract(trained, image_tree, out, crop="multiview", fmt="npz")
  folder = out / "tiny" / "multiview"
  assert sorted(os.listdir(folder)) == ["manifest.json", "test_embeddings.npz",
                                        "train_embeddings.npz", "val_embeddings.npz"]
  assert manifest["crop_description"].startswith("resized to round(image_size*8/7)")
  loaded = embeddings_lib.load_split(str(folder / "val_embeddings.npz"))
  model, _ = backbones.load_backbone(os.path.join(trained["dir"], "backbone"))
  path = os.path.join(image_tree, "Greek/character01/d0.png")
  big = image_views.preprocess(images_lib.decode_image(
      open(path, "rb").read(), path, images_lib.DecodeOptions(32, 1)), True).numpy()
  views = [big[dy:dy + 28, dx:dx + 28] for dy, dx in ((0, 0), (0, 4), (4, 0), (4, 4), (2, 2))]
  views += [v[:, ::-1] for v in views]
  expected = model(np.stack(views), training=False).numpy().mean(axis=0)
  np.testing.assert_allclose(loaded.embeddings[0], expected, rtol=1e-4, atol=1e-5)


def test_corrupt_image_fails_cleanly_or_is_skipped_and_reported(trained, image_tree, tmp_path):
  bad = os.path.join(image_tree, "Latin/character01/d1.png")
  with open(bad, "wb") as handle:
    handle.write(b"\x89PNG\r\n\x1a\n truncated")
  out = tmp_path / "out"
  with pytest.raises(errors.DataError, match=r"Latin/character01/d1\.png.*corrupt"):
    _extract(trained, image_tree, out)
  folder = out / "tiny" / "center"
  # train and val were written into the staging folder, which the failure removed whole.
  assert not folder.exists() and os.listdir(out / "tiny") == []
  manifest = _extract(trained, image_tree, out, skip_bad=True)
  assert manifest["splits"]["test"]["num_images"] == 5
  assert manifest["splits"]["test"]["skipped"][0]["image"] == bad
  assert embeddings_lib.load_split(str(folder / "test_embeddings.pkl")).embeddings.shape == (5, 64)


def test_killed_write_leaves_no_partial_pickle(trained, image_tree, tmp_path, monkeypatch):
  out = tmp_path / "out"
  _extract(trained, image_tree, out)
  folder = out / "tiny" / "center"
  before = (folder / "test_embeddings.pkl").read_bytes()
  real_replace = os.replace

  def killed(src, dst):
    if dst.endswith("test_embeddings.pkl"):
      raise KeyboardInterrupt  # the job dies between writing and renaming
    return real_replace(src, dst)
  monkeypatch.setattr(fileio.os, "replace", killed)
  with pytest.raises(KeyboardInterrupt):
    _extract(trained, image_tree, out, crop="center")
  assert (folder / "test_embeddings.pkl").read_bytes() == before
  assert not [n for n in os.listdir(folder) if ".tmp-" in n]
  assert os.listdir(out / "tiny") == ["center"]   # the staging folder removed


def test_class_tokens_are_safe_and_unique():
  tokens = extract.class_tokens(["Japanese_(katakana)/character01", "Japanesekatakana/character01",
                                 "n01532829", "---"])
  assert tokens["Japanese_(katakana)/character01"] == "Japanesekatakanacharacter01"
  assert tokens["Japanesekatakana/character01"] == "Japanesekatakanacharacter01x2"
  assert tokens["n01532829"] == "n01532829" and tokens["---"] == "class"
  for token in tokens.values():
    embedding_keys.make_key(token, 1)  # accepted by the key format


def test_benchmark_extraction_measures_images_per_second():
  result = extract.benchmark_extraction("conv4", 28, 1, batch_size=32, num_images=128,
                                       details=True)
  assert result["num_images"] == 128
  assert np.isfinite(result["images_per_s"]) and result["images_per_s"] > 0
  assert result["images_per_cpu_s"] > 0


def test_extract_cli_reports_user_errors_in_one_line(tmp_path):
  proc = scripts_run.run(
      [sys.executable, os.path.join(REPO, "scripts", "extract_embeddings.py"),
       f"--backbone_dir={tmp_path}/missing", f"--source={tmp_path}", "--split=omniglot_small"],
      capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.parametrize("flag", ["--rotated_splits=train", "--view_splits=train"])
def test_extract_cli_refuses_rotated_or_view_splits_without_a_split(tmp_path, flag):
  """--rotated_splits and --view_splits name splits of --split, extracted in one process."""
  for extra in ([], ["--split=omniglot_small", "--num_shards=2", "--shard_index=0"]):
    proc = scripts_run.run(
        [sys.executable, os.path.join(REPO, "scripts", "extract_embeddings.py"),
         f"--backbone_dir={tmp_path}", f"--source={tmp_path}", f"--out={tmp_path}/out",
         flag, *extra],
        capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --rotated_splits and --view_splits go with --split, in one process (no "
        "--num_shards, --merge)")
    assert not os.path.exists(tmp_path / "out")


# -- real data -----------------------------------------------------------------
OMNIGLOT_PIPELINE = os.path.join(REPO, "scripts", "omniglot_pipeline.py")


@pytest.fixture(scope="module")
def omniglot_work(omniglot_archives, tmp_path_factory):
  """One reduced pipeline run (2 epochs, baselines only) whose work directory the
  learners test goes on in: its pretraining and extraction are reused there."""
  work = tmp_path_factory.mktemp("omniglot") / "work"
  proc = scripts_run.run(
      [sys.executable, OMNIGLOT_PIPELINE,
       f"--omniglot_dir={os.path.dirname(omniglot_archives[0])}", f"--work_dir={work}",
       "--epochs=2", "--num_episodes=100", "--val_episodes=0", "--learners=",
       # One view per image (the default, warps, averages 16: tests/test_report.py
       # checks the default, tests/test_predict.py the warps views themselves).
       "--crop=center"],
      capture_output=True, text=True, timeout=1200, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return work, json.loads((work / "results.json").read_text()), (work / "results.md").read_text()


@pytest.mark.integration
@pytest.mark.slow
def test_reduced_omniglot_pipeline_beats_pixels(omniglot_work):
  work, results, text = omniglot_work
  manifest = results["manifest"]
  assert {k: (v["num_images"], v["num_classes"]) for k, v in manifest["splits"].items()} == {
      "train": (3540, 177), "val": (780, 39), "test": (520, 26)}
  assert "Japanese_(katakana)/character01" in manifest["class_names"].values()
  assert manifest["crop"] == "center"       # --crop reaches the extraction
  for split in ("train", "val", "test"):  # what runner.py --dataset_name=omniglot_small reads
    embeddings_lib.load_dataset_split(str(work / "embeddings"), "omniglot_small", "center", split)
  rows = {(r["method"].split(" (")[0] + (" px" if "pixels" in r["method"] else ""), r["setting"]): r
          for r in results["rows"]}
  ncm, pixels = rows[("ncm_cosine", "5w1s")], rows[("ncm_cosine px", "5w1s")]
  assert ncm["num_tasks"] == 100
  assert ncm["accuracy"] > 20 + 5 * ncm["ci95"]                 # far above chance
  assert ncm["accuracy"] - ncm["ci95"] > pixels["accuracy"] + pixels["ci95"]
  assert rows[("logistic_regression", "20w1s")]["accuracy"] > 5 + 5 * rows[
      ("logistic_regression", "20w1s")]["ci95"]
  assert "| ncm_cosine (Conv-4 embeddings) |" in text
  # How hard each split's episodes are (issue 31): the meta-test row is the
  # table's own NCM row (same seeded episodes, same scoring).
  by_split = {(r["split"], r["setting"]): r for r in results["ncm_by_split"]}
  assert set(by_split) == {(s, c) for s in ("train", "val", "test")
                           for c in ("5w1s", "5w5s", "20w1s")}
  for setting in ("5w1s", "5w5s", "20w1s"):
    assert by_split[("test", setting)]["accuracy"] == rows[("ncm_cosine", setting)]["accuracy"]
  assert "| ncm_cosine, meta-train episodes |" in text


@pytest.mark.integration
@pytest.mark.slow
def test_omniglot_pipeline_takes_other_archives_and_alphabets(omniglot_archives, tmp_path):
  """Other alphabets than the repository's protocol (one archive, a split of
  its own): the table names the meta-test alphabet it scored."""
  split = tmp_path / "split.json"
  split.write_text(json.dumps({"train": ["Balinese", "Korean"], "val": ["Early_Aramaic"],
                               "test": ["Greek"]}))
  work = tmp_path / "work"
  command = [sys.executable, os.path.join(REPO, "scripts", "omniglot_pipeline.py"),
             f"--omniglot_dir={os.path.dirname(omniglot_archives[0])}", f"--work_dir={work}",
             f"--archives={os.path.basename(omniglot_archives[0])}", f"--split={split}",
             "--epochs=1", "--num_episodes=20", "--val_episodes=0", "--learners=",
             "--settings=5w1s", "--pixel_baseline=false", "--distill_generations=1",
             "--crop=center"]  # one view per image (see the test above)
  proc = scripts_run.run(command, capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((work / "results.json").read_text())
  splits = results["manifest"]["splits"]
  # Balinese 24 + Korean 40 characters; Early_Aramaic 22; Greek 24 (20 drawings each).
  assert {k: v["num_classes"] for k, v in splits.items()} == {"train": 64, "val": 22,
                                                              "test": 24}
  assert all(v["num_images"] == 20 * v["num_classes"] for v in splits.values())
  assert "meta-test (Greek, 24 characters)" in (work / "results.md").read_text()
  # One born-again generation (an option, off by default): the extracted backbone
  # is the student's, distilled from the first network's last checkpoint.
  assert "[stage] distill done in" in proc.stdout
  student = results["pretrain"]["export"]
  assert student["teacher"]["run_dir"] == str(work / "pretrain")
  assert results["manifest"]["backbone"]["checkpoint_sha256"] == fileio.file_sha256(
      str(work / "pretrain_gen1" / "backbone" / backbones.BACKBONE_WEIGHTS))
  # A missing archive is a one-line error.
  bad = scripts_run.run(command[:2] + [f"--work_dir={tmp_path / 'bad'}",
                                      "--archives=images_background_large.zip"],
                        capture_output=True, text=True, timeout=300, check=False)
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert "images_background_large.zip: Omniglot archive not found" in bad.stderr
  assert not (tmp_path / "bad").exists()


@pytest.mark.integration
@pytest.mark.slow
def test_reduced_omniglot_pipeline_learners_reach_nearest_class_mean(omniglot_archives,
                                                                     omniglot_work):
  """Learners with their Omniglot presets (best validation checkpoint) on real features:
  each at or above nearest class mean on the same episodes, within NCM's 95% CI."""
  work = omniglot_work[0]
  command = [sys.executable, OMNIGLOT_PIPELINE,
             f"--omniglot_dir={os.path.dirname(omniglot_archives[0])}", f"--work_dir={work}",
             "--epochs=2", "--num_episodes=100", "--val_episodes=0", "--settings=5w1s,5w5s",
             "--learners=protonet,r2d2,maml", "--pixel_baseline=false",
             "--runner_steps=20",  # validated at steps 0, 10 and 20 (presets: every 10)
             # One view per image (see the first test), plain steps (XLA is
             # tests/test_xla.py's): what is checked here is the learners.
             "--crop=center", "--runner_flag=--jit_compile=false"]
  proc = scripts_run.run(command, capture_output=True, text=True, timeout=1800, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # The fixture's backbone and embeddings, reused (same recipe, same backbone).
  assert "embeddings already extracted from backbone" in proc.stdout
  assert "[stage] learners done in" in proc.stdout
  results = json.loads((work / "results.json").read_text())
  # No distillation by default: the first network's backbone is extracted.
  assert "[stage] distill" not in proc.stdout
  assert results["manifest"]["backbone"]["checkpoint_sha256"] == fileio.file_sha256(
      str(work / "pretrain" / "backbone" / backbones.BACKBONE_WEIGHTS))
  ncm = {r["setting"]: r for r in results["rows"] if r["method"].startswith("ncm_cosine")}
  learners = [r for r in results["rows"] if r["method"].endswith("(runner.py)")]
  assert {(r["method"], r["setting"]) for r in learners} == {
      (f"{m} (runner.py)", s) for m in ("protonet", "r2d2", "maml") for s in ("5w1s", "5w5s")}
  # MAML's 5w5s preset starts each task at its prototypes (head_init=proto).
  config = json.loads((work / "learners" / "maml_5w5s" / "config.json").read_text())
  assert config["settings"]["maml_head_init"] == "proto", config["settings"]
  for row in learners:
    assert "accuracy" in row, row
    # Validated (step 0, the initialisation, is a candidate: see the trainer).
    assert row["best_step"] >= 0 and row["val_accuracy"] > 20
    base = ncm[row["setting"]]
    assert row["accuracy"] >= base["accuracy"] - base["ci95"], (row, base)
    # Its meta-train batches beside meta-val, read from the run's summaries.
    gap = row["gap"]
    assert gap["val_accuracy_chosen"] == pytest.approx(row["val_accuracy"], abs=1e-3)
    assert 20 < gap["train_accuracy_first"] <= 100 and 20 < gap["val_accuracy_step0"] <= 100
  text = (work / "results.md").read_text()
  assert "(val " in text and "learners" in text
  threads = os.environ.get("TF_NUM_INTRAOP_THREADS", max(1, (os.cpu_count() or 1) // 2))
  assert f"2 at a time, {threads} TensorFlow thread(s) each" in text
  # Resumes: a second run reuses every finished stage and prints the same table.
  again = scripts_run.run(command, capture_output=True, text=True, timeout=600, check=False)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "reusing" in again.stdout
  assert json.loads((work / "results.json").read_text())["rows"] == results["rows"]


@pytest.mark.slow
def test_pretrain_then_extract_clis_on_a_folder_tree(image_tree, tmp_path):
  split = tmp_path / "split.json"
  split.write_text(json.dumps({"train": ["Japanese_(katakana)"], "val": ["Greek"],
                               "test": ["Latin", "Latin-x"]}))
  run = [sys.executable, os.path.join(REPO, "scripts", "pretrain.py"), f"--source={image_tree}",
         f"--split={split}", f"--out_dir={tmp_path / 'run'}", "--epochs=1", "--batch_size=4",
         "--expected_size=105x105"]
  proc = scripts_run.run(run, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "6 images of 2 classes (8 with rotations)" in proc.stdout
  proc = scripts_run.run(
      [sys.executable, os.path.join(REPO, "scripts", "extract_embeddings.py"),
       f"--backbone_dir={tmp_path / 'run' / 'backbone'}", f"--source={image_tree}",
       f"--split={split}", f"--out={tmp_path / 'emb'}", "--dataset_name=tiny",
       "--format=npz"], capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  test = embeddings_lib.load_dataset_split(str(tmp_path / "emb"), "tiny", "center", "test")
  assert test.source and list(test.source)[0].endswith("test_embeddings.npz")
  assert test.num_classes == 2 and test.embeddings.shape == (6, 64)


def test_mean_dot_is_one_gradient_step_from_a_zero_head_and_ncm_at_one_shot():
  """mean_dot (a row of baselines.BASELINES): at 1-shot it is cosine NCM; at
  any shot its argmax is that of a zero linear head after one gradient step of
  the support cross-entropy (W_c = lr * mean_i (y_ic - 1/N) x_i)."""
  module = baselines
  rng = np.random.default_rng(0)
  query = rng.normal(size=[3, 5, 7, 16]).astype(np.float32)
  one = rng.normal(size=[3, 5, 1, 16]).astype(np.float32)
  np.testing.assert_allclose(module.mean_dot_logits(one, query),
                             baselines.ncm_cosine_logits(one, query), atol=1e-6)
  support = rng.normal(size=[3, 5, 4, 16]).astype(np.float32)
  unit_s, unit_q = _normalize(support), _normalize(query)
  x = unit_s.reshape(3, 20, 16)
  y = np.repeat(np.eye(5), 4, axis=0)                                # [20, 5]
  weights = np.einsum("ic,bid->bcd", y - 1.0 / 5, x) / 20            # the step's -gradient
  head = np.einsum("bnvd,bcd->bnvc", unit_q, weights)
  mean_dot = module.mean_dot_logits(support, query).numpy()
  np.testing.assert_array_equal(np.argmax(mean_dot, -1), np.argmax(head, -1))
  ncm = baselines.ncm_cosine_logits(support, query).numpy()
  assert np.any(np.argmax(ncm, -1) != np.argmax(mean_dot, -1))       # not NCM at 5-shot
