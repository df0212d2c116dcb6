"""Serving hardening: an exported image model embeds exactly as extraction does;
non-finite, huge and all-zero embeddings at every signature; export file modes."""

import io
import json
import os
import stat
import urllib.error
import urllib.request

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from leo_suite.data import embeddings as embeddings_lib
from leo_suite.data import image_sources
from leo_suite.data import images as images_lib
from leo_suite.models import backbones
from leo_suite.pretrain import classifier as classifier_lib
from leo_suite.pretrain import extract as extract_lib
from leo_suite.pretrain import pretrain_config
from leo_suite.serving import export
from leo_suite.serving import rest
from leo_suite.serving import support as support_lib
from tests import test_serving as serving
from tests.test_serving import exports  # pylint: disable=unused-import  (fixture)

D = serving.D


# -- serving sees what extraction saw ---------------------------------------------
def _encode(array, fmt):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=fmt)
  return buffer.getvalue()


def _test_images(rng):
  """{file name: bytes}: sizes that need resizing (non-square), grey and colour."""
  smooth = np.asarray(Image.fromarray(rng.integers(0, 256, [6, 5, 3], np.uint8)).resize(
      (37, 45), Image.Resampling.BICUBIC))
  return {"a_grey_37x45.png": _encode(rng.integers(0, 256, [45, 37], np.uint8), "PNG"),
          "b_rgb_37x45.png": _encode(rng.integers(0, 256, [45, 37, 3], np.uint8), "PNG"),
          "c_rgb_37x45.jpg": _encode(smooth, "JPEG"),
          "d_grey_28x28.png": _encode(rng.integers(0, 256, [28, 28], np.uint8), "PNG")}


@pytest.mark.parametrize("channels", [1, 3])
def test_image_signature_embeds_exactly_as_extraction(tmp_path, channels):
  tf.keras.utils.set_random_seed(channels)
  backbone = backbones.build_backbone("conv4", 28, channels)
  config = pretrain_config.PretrainConfig(backbone="conv4", image_size=28, channels=channels,
                                          invert=True)
  backbone_dir = str(tmp_path / "backbone")
  classifier_lib.export_backbone(backbone, config, backbone_dir)
  model, description = backbones.load_backbone(backbone_dir)
  dim = int(description["feature_dim"])
  serving.make_run(tmp_path / "run", "r2d2", steps=1, dim=dim)
  rng = np.random.default_rng(channels)
  support = support_lib.SupportSet(serving.CLASS_NAMES, rng.standard_normal(
      [serving.N, serving.K, dim]).astype(np.float32), "support")
  exported = export.export_classifier(str(tmp_path / "run"), support, str(tmp_path / "serve"),
                                      backbone=model, backbone_description=description)
  files = _test_images(rng)
  (tmp_path / "tree" / "glyphs").mkdir(parents=True)
  for name, payload in files.items():
    (tmp_path / "tree" / "glyphs" / name).write_bytes(payload)
  by_class = image_sources.group_by_class(image_sources.scan_directory(str(tmp_path / "tree")))
  extract_lib.extract_embeddings(backbone_dir, by_class, {"test": ["glyphs"]},
                                 str(tmp_path / "emb"), "t", log=lambda _: None)
  extracted = embeddings_lib.load_split(str(tmp_path / "emb" / "t" / "center" /
                                            "test_embeddings.pkl")).embeddings
  loaded = tf.saved_model.load(exported.path)
  served = loaded.signatures["serving_default"](images=tf.constant(list(files.values())))
  assert extracted.shape == (len(files), dim) and np.ptp(extracted) > 1e-3
  np.testing.assert_allclose(served["embeddings"].numpy(), extracted, rtol=0, atol=1e-5)
  from_embeddings = loaded.signatures["predict_embeddings"](embeddings=tf.constant(extracted))
  np.testing.assert_allclose(served["logits"].numpy(), from_embeddings["logits"].numpy(),
                             atol=1e-5)
  # The same bytes one at a time (another batch size) give the same embeddings.
  alone = loaded.signatures["serving_default"](images=tf.constant([files["c_rgb_37x45.jpg"]]))
  np.testing.assert_allclose(alone["embeddings"].numpy()[0], extracted[2], atol=1e-5)


def test_decode_encoded_reads_pixels_as_pil_does():
  """Without a resize (S = the image size) the pixels are PIL's, mode for mode."""
  rng = np.random.default_rng(0)
  colour = np.asarray(Image.fromarray(rng.integers(0, 256, [6, 6, 3], np.uint8)).resize(
      (37, 37), Image.Resampling.BICUBIC))
  alpha = np.dstack([colour, rng.integers(0, 256, [37, 37], np.uint8)])
  for payload in (_encode(colour, "PNG"), _encode(colour, "JPEG"), _encode(colour, "GIF"),
                  _encode(alpha, "PNG"), _encode(colour[..., 0], "JPEG")):
    pil = Image.open(io.BytesIO(payload))
    for channels, mode in ((1, "L"), (3, "RGB")):
      decoded = images_lib.decode_encoded(tf.constant(payload), 37, channels).numpy()
      expected = np.asarray(pil.convert(mode)).reshape(37, 37, channels)
      np.testing.assert_array_equal(decoded, expected, err_msg=f"{pil.format} {pil.mode}")


# -- non-finite, huge and zero embeddings -------------------------------------------
@pytest.fixture(scope="module")
def served(exports):  # pylint: disable=redefined-outer-name
  entry = exports["r2d2"]
  return entry, tf.saved_model.load(entry["path"]).signatures


BAD_ROWS = (("nan", np.nan, "must be finite.*NaN"), ("inf", np.inf, "must be finite.*Inf"),
            ("-inf", -np.inf, "must be finite.*Inf"), ("zero", 0.0, "all-zero row"))


def _spoil(x, value):
  """A copy of `x` [rows, D] whose row 1 is all `value` (0) or holds one `value`."""
  bad = x.copy()
  bad[1, slice(None) if value == 0 else 3] = value
  return bad


def _examples(rows):
  return tf.constant([rest.make_example({export.EXAMPLE_FEATURE: row.tolist()})
                      .SerializeToString() for row in rows])


def test_non_finite_and_zero_embeddings_are_refused_by_every_signature(served, exports):  # pylint: disable=redefined-outer-name
  entry, sigs = served
  queries = exports.queries
  support = entry["support2_flat"]
  labels = tf.constant(entry["support2_labels"])
  for case, value, pattern in BAD_ROWS:
    bad_queries, bad_support = _spoil(queries, value), _spoil(support, value)
    calls = {
        "embeddings": lambda: sigs["serving_default"](embeddings=tf.constant(bad_queries)),
        "embedding feature": lambda: sigs["classify"](inputs=_examples(bad_queries)),
        "query_embeddings": lambda: sigs["adapt_and_predict"](
            support_embeddings=tf.constant(support), support_labels=labels,
            query_embeddings=tf.constant(bad_queries)),
        "support_embeddings": lambda: sigs["adapt_and_predict"](
            support_embeddings=tf.constant(bad_support), support_labels=labels,
            query_embeddings=tf.constant(queries)),
    }
    for name, call in calls.items():
      with pytest.raises(tf.errors.InvalidArgumentError, match=f"{name}.*{pattern}") as info:
        call()
      assert "send the raw" in str(info.value), (case, name, str(info.value))


def test_huge_and_tiny_embeddings_give_the_unit_vectors_probabilities(served, exports):  # pylint: disable=redefined-outer-name
  entry, sigs = served
  queries = exports.queries
  unit = queries / np.linalg.norm(queries, axis=-1, keepdims=True)
  expected = serving.softmax(entry["logits"])

  def predict(x):
    return sigs["serving_default"](embeddings=tf.constant(x))["probabilities"].numpy()

  np.testing.assert_allclose(predict(unit), expected, atol=1e-5)
  for scale in (1e38, 1e-30):   # the norm would overflow / underflow
    scaled = (unit * np.float32(scale)).astype(np.float32)
    assert np.isfinite(scaled).all() and (np.abs(scaled).max(-1) > 0).all()
    np.testing.assert_allclose(predict(scaled), predict(unit), atol=1e-6, err_msg=str(scale))
  scores = sigs["classify"](inputs=_examples(unit * np.float32(1e38)))["scores"].numpy()
  np.testing.assert_allclose(scores, expected, atol=1e-5)
  support = entry["support2_flat"]
  labels = tf.constant(entry["support2_labels"])

  def adapt(s, q):
    return sigs["adapt_and_predict"](support_embeddings=tf.constant(s), support_labels=labels,
                                     query_embeddings=tf.constant(q))["probabilities"].numpy()

  s_unit = support / np.linalg.norm(support, axis=-1, keepdims=True)
  np.testing.assert_allclose(adapt(s_unit * np.float32(1e38), unit * np.float32(1e38)),
                             serving.softmax(entry["adapt_logits"]), atol=1e-5)


def test_rest_nan_request_is_a_400_not_a_nan_prediction(served):  # pylint: disable=redefined-outer-name
  entry, _ = served
  server = rest.LoopbackServer(os.path.dirname(entry["path"]), "r2d2").start()
  try:
    row = [0.5] * D
    row[2] = float("nan")
    request = urllib.request.Request(
        f"{server.url}:predict", json.dumps({"instances": [row]}).encode(),
        {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
      urllib.request.urlopen(request, timeout=60)
    assert info.value.code == 400
    error = json.load(info.value)["error"]
    assert "must be finite: found NaN or inf" in error and "Graph execution" not in error
  finally:
    server.stop()


def test_all_zero_support_example_is_refused_at_export():
  groups = {"cat": np.ones([2, D]), "dog": np.ones([2, D]), "owl": np.ones([2, D])}
  groups["owl"][1] = 0.0
  with pytest.raises(export.errors.DataError, match="example 1 of class 'owl' is all zeros"):
    support_lib.support_from_groups(groups, "groups")


# -- file modes ---------------------------------------------------------------------
def _modes(root):
  """{relative path: permission bits} of a tree, `root` itself as '.'."""
  found = {".": stat.S_IMODE(os.stat(root).st_mode)}
  for directory, dirs, files in os.walk(root):
    for name in dirs + files:
      path = os.path.join(directory, name)
      found[os.path.relpath(path, root)] = stat.S_IMODE(os.stat(path).st_mode)
  return found


def _assert_modes(root, dir_mode, file_mode):
  modes = _modes(root)
  assert "saved_model.pb" in modes and export.EXPORT_INFO in modes
  for relative, mode in modes.items():
    wanted = dir_mode if os.path.isdir(os.path.join(root, relative)) else file_mode
    assert mode == wanted, (relative, oct(mode), oct(wanted))


@pytest.mark.parametrize("private", [False, True])
def test_export_modes_ignore_the_umask(exports, tmp_path, private):  # pylint: disable=redefined-outer-name
  module = export.AdaptedClassifier(exports["r2d2"]["learner"],
                                    serving.support_set(np.random.default_rng(9)))
  dir_mode, file_mode = (0o700, 0o600) if private else (0o755, 0o644)
  previous = os.umask(0o022 if private else 0o077)   # the opposite of what is wanted
  try:
    result = export.write_version(module, str(tmp_path / "base"), "m", private=private)
  finally:
    os.umask(previous)
  _assert_modes(result.path, dir_mode, file_mode)
  for created in (tmp_path / "base", tmp_path / "base" / "m"):
    assert stat.S_IMODE(os.stat(created).st_mode) == dir_mode, created
  assert os.listdir(tmp_path / "base" / "m") == ["1"]


def test_default_export_is_world_readable(exports):  # pylint: disable=redefined-outer-name
  _assert_modes(exports["r2d2"]["path"], 0o755, 0o644)
