"""Export an adapted few-shot classifier as a TensorFlow Serving SavedModel.

A meta-learner checkpoint (a runner run directory) is adapted ONCE to a support
set (N named classes, K examples each) and written to

    <export_base>/<model_name>/<version>/{saved_model.pb, variables/, assets.extra/}

the layout `tensorflow_model_server --model_base_path=<export_base>/<model_name>`
polls. Versions are integers that only increase; an existing version is never
overwritten. The SavedModel is written into a hidden temporary directory beside
the versions (`.tmp-export-*`, a name TF Serving ignores) and renamed to its
number only when complete, so a killed export never leaves a half-written
version that the server would try to load. Its directories are made 0755 and
its files 0644 whatever the umask, so a model server running as another user
can read them (`private=True`: 0700 / 0600, readable by the owner only).

Signatures (all inputs float32 / string / int32, outputs float32 unless said):

  serving_default   embeddings [batch, D] -> probabilities [batch, N],
                    classes [batch] (string: argmax class name), logits [batch, N].
                    With a bundled backbone the input is instead `images`
                    [batch] (encoded PNG/JPEG/GIF/WebP/BMP strings, REST
                    {"b64": ...}), decoded, resized and embedded inside the graph
                    by the very functions extraction uses
                    (`images.decode_encoded`, `image_views.embed`; an image whose
                    header claims more than $LEO_SUITE_MAX_IMAGE_PIXELS at export
                    time is refused before decoding), with the backbone
                    features as the extra output `embeddings` [batch, D];
                    `predict_embeddings` then keeps the embeddings input.
  classify          inputs [batch] serialized tf.Example with float feature
                    `embedding` (length D) -> classes [batch, N] (string: all
                    class names), scores [batch, N] (probabilities). This is the
                    shape TF Serving's Classify API / REST :classify expects.
  adapt_and_predict support_embeddings [N*K, D], support_labels [N*K] (int32 in
                    0..N-1, any order, exactly K per class), query_embeddings
                    [batch, D] -> logits [batch, N], probabilities [batch, N],
                    class_ids [batch] (int32): adapts the learner per request
                    (N and K fixed to the exported support set's).

Embeddings are L2-normalised inside the graph (as the episode sampler does in
training; rows are first divided by their largest magnitude, so 1e38 does not
overflow), so clients send raw backbone features. Every embeddings input
(`embeddings`, the `embedding` feature of `classify`, `support_embeddings`,
`query_embeddings`) with a NaN, inf or denormal value, or with an all-zero row
(no direction to normalise), and an empty batch are refused with an
InvalidArgumentError saying so. The
exported graph uses only
TensorFlow ops: `tf.saved_model.load` needs nothing from leo_suite.

TF2 writes the method name `tensorflow/serving/predict` on every signature;
`tensorflow_model_server` still serves :classify on it because
--enable_signature_method_name_check defaults to false.
"""

import dataclasses
import json
import os
import re
import shutil
import tempfile
from typing import Optional

import tensorflow as tf

from leo_suite import errors
from leo_suite import safeio
from leo_suite.data import image_views
from leo_suite.data import images as images_lib
from leo_suite.models import image_embedder
from leo_suite.serving import sets
from leo_suite.serving import support as support_lib
from leo_suite.training import run as run_lib

SIGNATURE_PREDICT = "serving_default"
SIGNATURE_PREDICT_EMBEDDINGS = "predict_embeddings"
SIGNATURE_CLASSIFY = "classify"
SIGNATURE_ADAPT = "adapt_and_predict"
EXAMPLE_FEATURE = "embedding"
EXPORT_INFO = os.path.join("assets.extra", "leo_suite_export.json")
TMP_PREFIX = ".tmp-export-"
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def run_crop(run) -> str:
  """The extraction crop of the run's embeddings, which image inputs get too
  (a dataset named by another pipeline's crop: the center view)."""
  crop = run.settings.get("embedding_crop", "center")
  return crop if crop in image_views.CROPS else "center"


def load_support(path: str, backbone_dir: Optional[str] = None, num_shots: int = 0,
                 batch_size: int = 64, crop: str = "center", num_ways: int = 0):
  """Any support form of `leo_suite.serving.sets` -> (SupportSet, backbone, description).

  Images (a class-per-folder tree, or a folder/CSV of `file,label`) are
  embedded by the backbone in `backbone_dir` exactly as extraction does with
  `crop` (give the run's, `run_crop`: the exported graph embeds images the
  same way); embeddings files need no backbone. The backbone and its
  description are None without `backbone_dir`. `num_ways` > 0: the number of
  classes is checked before any image is embedded.
  """
  embedder = (image_embedder.ImageEmbedder(backbone_dir, crop, batch_size,
                                             tool_flags=False)
              if backbone_dir else None)
  support = sets.load_set(path, "support", embedder, num_shots, num_ways).to_support(num_shots)
  return (support, embedder and embedder.model, embedder and embedder.description)


def load_support_embeddings(path: str, num_shots: int = 0) -> support_lib.SupportSet:
  """A LEO-format .pkl/.npz (keys give the classes, the manifest beside their names)."""
  return load_support(path, None, num_shots)[0]


# -- the meta-learner checkpoint --------------------------------------------------
@dataclasses.dataclass
class RestoredRun:
  """A run directory's learner with its evaluation checkpoint's weights."""
  run: run_lib.Run
  learner: object
  checkpoint: str


def restore_learner(run: run_lib.Run) -> RestoredRun:
  """Rebuilds the run's learner (its settings; best, else latest weights)."""
  learner, checkpoint = run.restored_learner()
  return RestoredRun(run, learner, checkpoint)


# -- the serving module -----------------------------------------------------------
class AdaptedClassifier(tf.Module):
  """A learner adapted to one support set, with TF Serving signatures."""

  def __init__(self, learner, support: support_lib.SupportSet, backbone=None,
               backbone_description: Optional[dict] = None, crop: str = "center"):
    super().__init__(name="adapted_classifier")
    support_lib.check_ways(support.class_names, learner.num_ways, support.origin)
    if support.dim != learner.embedding_dim:
      raise errors.DataError(
          f"{support.origin}: support embeddings have D={support.dim} but the "
          f"checkpoint was trained on D={learner.embedding_dim}; use embeddings "
          "from the backbone the learner was trained on")
    feature_dim = (backbone_description or {}).get("feature_dim")
    if backbone is not None and feature_dim is not None and int(feature_dim) != support.dim:
      raise errors.DataError(
          f"the backbone gives {feature_dim}-d features but the learner and the "
          f"support set are D={support.dim}; bundle the backbone the learner's "
          "embeddings were extracted with")
    self.learner = learner
    self.num_ways, self.num_shots, self.dim = support.num_ways, support.num_shots, support.dim
    self.class_names = tf.constant(list(support.class_names), tf.string)
    self._zero_seed = tf.zeros([2], tf.int32)
    state = support_lib.adapt_support(learner, tf.constant(support.embeddings))
    self.state = tf.nest.map_structure(
        lambda t: tf.Variable(t, trainable=False, name="adapted_state"), state)
    self.backbone = backbone
    self.backbone_description = dict(backbone_description or {})
    self.crop = crop
    self.max_pixels = safeio.max_image_pixels()   # checked in the graph before decoding
    d = self.dim
    self.predict_embeddings = tf.function(
        self._predict_embeddings, autograph=False,
        input_signature=[tf.TensorSpec([None, d], tf.float32, name="embeddings")])
    self.classify = tf.function(
        self._classify, autograph=False,
        input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    nk = self.num_ways * self.num_shots
    self.adapt_and_predict = tf.function(
        self._adapt_and_predict, autograph=False, input_signature=[
            tf.TensorSpec([nk, d], tf.float32, name="support_embeddings"),
            tf.TensorSpec([nk], tf.int32, name="support_labels"),
            tf.TensorSpec([None, d], tf.float32, name="query_embeddings")])
    if backbone is not None:
      self.predict_images = tf.function(
          self._predict_images, autograph=False,
          input_signature=[tf.TensorSpec([None], tf.string, name="images")])

  def normalise(self, embeddings):
    """L2-normalise in float32 then cast, as the training sampler does.

    Rows are divided by their largest magnitude first, so the norm neither
    overflows (1e38) nor underflows (1e-38); all-zero rows stay zero.
    """
    return support_lib.normalise(embeddings, self.learner.dtype)

  def query_logits(self, state, embeddings):
    """Embeddings [batch, D] -> logits [batch, N] (float32) of an adapted state."""
    return support_lib.query_logits(self.learner, state, embeddings)

  def _outputs(self, logits):
    return {"probabilities": tf.nn.softmax(logits),
            "classes": tf.gather(self.class_names, tf.argmax(logits, axis=-1)),
            "logits": logits}

  def _predict_embeddings(self, embeddings):
    embeddings = tf.ensure_shape(embeddings, [None, self.dim], name="embeddings")
    embeddings = support_lib.checked_embeddings(embeddings, "embeddings")
    return self._outputs(self.query_logits(self.state, embeddings))

  def _classify(self, inputs):
    inputs = tf.ensure_shape(inputs, [None], name="inputs")
    features = tf.io.parse_example(
        inputs, {EXAMPLE_FEATURE: tf.io.FixedLenFeature([self.dim], tf.float32)})
    embeddings = support_lib.checked_embeddings(features[EXAMPLE_FEATURE],
                                    f"the {EXAMPLE_FEATURE} feature of classify inputs")
    scores = tf.nn.softmax(self.query_logits(self.state, embeddings))
    classes = tf.tile(self.class_names[tf.newaxis], [tf.shape(scores)[0], 1])
    return {"classes": classes, "scores": scores}

  def _adapt_and_predict(self, support_embeddings, support_labels, query_embeddings):
    n, k = self.num_ways, self.num_shots
    support_embeddings = tf.ensure_shape(support_embeddings, [n * k, self.dim],
                                         name="support_embeddings")
    support_labels = tf.ensure_shape(support_labels, [n * k], name="support_labels")
    query_embeddings = tf.ensure_shape(query_embeddings, [None, self.dim],
                                       name="query_embeddings")
    support_embeddings = support_lib.checked_embeddings(support_embeddings,
                                                        "support_embeddings")
    query_embeddings = support_lib.checked_embeddings(query_embeddings, "query_embeddings")
    tf.debugging.assert_greater_equal(
        support_labels, 0, message=f"support_labels must be in 0..{n - 1}")
    tf.debugging.assert_less(support_labels, n,
                             message=f"support_labels must be in 0..{n - 1}")
    counts = tf.math.bincount(support_labels, minlength=n, maxlength=n)
    tf.debugging.assert_equal(
        counts, k, message=f"adapt_and_predict needs exactly K={k} support "
        f"examples of each of the N={n} classes (support_labels 0..{n - 1})")
    order = tf.argsort(support_labels, stable=True)      # group by class
    support_x = tf.reshape(tf.gather(self.normalise(support_embeddings), order),
                           [1, n, k, self.dim])
    support_y = tf.reshape(tf.gather(support_labels, order), [1, n, k])
    state = self.learner.adapt(support_x, support_y, training=False, seed=self._zero_seed)
    logits = self.query_logits(state, query_embeddings)
    return {"logits": logits, "probabilities": tf.nn.softmax(logits),
            "class_ids": tf.argmax(logits, axis=-1, output_type=tf.int32)}

  def embed_images(self, images):
    """Encoded image strings [batch] -> backbone features [batch, D] float32.

    Decoded and embedded by extraction's own functions, with the crop the
    run's embeddings were extracted with.
    """
    info = self.backbone_description
    size, channels = int(info["image_size"]), int(info["channels"])
    loaded = image_views.load_size(self.crop, size)
    decoded = tf.map_fn(lambda s: images_lib.decode_encoded(s, loaded, channels, self.max_pixels),
                        images,
                        fn_output_signature=tf.TensorSpec([loaded, loaded, channels], tf.uint8))
    return image_views.embed(self.backbone, decoded, self.crop, size, bool(info.get("invert")))

  def _predict_images(self, images):
    images = support_lib.checked_batch(tf.ensure_shape(images, [None], name="images"), "images")
    embeddings = self.embed_images(images)
    outputs = self._outputs(self.query_logits(self.state, embeddings))
    return dict(outputs, embeddings=embeddings)

  def signatures(self):
    """{signature name: tf.function} as exported."""
    signatures = {SIGNATURE_CLASSIFY: self.classify, SIGNATURE_ADAPT: self.adapt_and_predict}
    if self.backbone is not None:
      signatures[SIGNATURE_PREDICT] = self.predict_images
      signatures[SIGNATURE_PREDICT_EMBEDDINGS] = self.predict_embeddings
    else:
      signatures[SIGNATURE_PREDICT] = self.predict_embeddings
    return signatures


# -- writing versions ---------------------------------------------------------------
def check_model_name(name: str):
  if not _MODEL_NAME.fullmatch(name or ""):
    raise errors.ConfigError(
        f"--model_name={name!r}: use letters, digits, '.', '_' and '-' (starting "
        "with a letter or digit); it becomes a directory TF Serving serves")


def existing_versions(model_dir: str):
  if not os.path.isdir(model_dir):
    return []
  return sorted(int(n) for n in os.listdir(model_dir)
                if n.isdigit() and os.path.isdir(os.path.join(model_dir, n)))


def _modes(private: bool):
  """(directory mode, file mode) of an export."""
  return (0o700, 0o600) if private else (0o755, 0o644)


def _set_modes(root: str, private: bool):
  """chmod every directory and file under `root` (the umask does not matter)."""
  dir_mode, file_mode = _modes(private)
  for directory, _, files in os.walk(root):
    os.chmod(directory, dir_mode)
    for name in files:
      os.chmod(os.path.join(directory, name), file_mode)


def _make_dirs(path: str, private: bool) -> bool:
  """os.makedirs(path) with export modes on what it creates; True if it did."""
  missing = []
  while path and not os.path.isdir(path):
    missing.append(path)
    path = os.path.dirname(path)
  if missing:
    os.makedirs(missing[0], exist_ok=True)
  for directory in missing:
    os.chmod(directory, _modes(private)[0])
  return bool(missing)


@dataclasses.dataclass(frozen=True)
class ExportResult:
  path: str          # <export_base>/<model_name>/<version>
  version: int
  info: dict


def write_version(module: AdaptedClassifier, export_base: str, model_name: str,
                  version: int = 0, info: Optional[dict] = None, *,
                  private: bool = False) -> ExportResult:
  """Saves `module` as the next (or the given, new) version of `model_name`.

  Directories it creates are 0755 and files 0644, for a model server running
  as another user; `private` makes them 0700 and 0600.
  """
  check_model_name(model_name)
  if version < 0:
    raise errors.ConfigError(f"--version={version}: must be >= 1 (0 = next)")
  model_dir = os.path.join(export_base, model_name)
  if version and version in existing_versions(model_dir):
    raise errors.UserError(
        f"{os.path.join(model_dir, str(version))} exists; versions are never "
        "overwritten: omit --version to write the next one")
  created_base = _make_dirs(model_dir, private)
  staging = tempfile.mkdtemp(prefix=TMP_PREFIX, dir=model_dir)
  try:
    tf.saved_model.save(module, staging, signatures=module.signatures())
    info = dict(info or {}, signatures=sorted(module.signatures()))
    os.makedirs(os.path.join(staging, os.path.dirname(EXPORT_INFO)), exist_ok=True)
    with open(os.path.join(staging, EXPORT_INFO), "w") as handle:
      json.dump(info, handle, indent=1, sort_keys=True)
    _set_modes(staging, private)
    while True:
      taken = [int(n) for n in os.listdir(model_dir) if n.isdigit()]   # files too
      number = version or (max(taken, default=0) + 1)
      final = os.path.join(model_dir, str(number))
      if os.path.exists(final):
        if version:
          raise errors.UserError(f"{final} appeared while exporting; not overwritten")
        continue
      try:
        os.rename(staging, final)   # atomic; fails if another export filled `final`
        break
      except OSError:
        if version or not os.path.exists(final):
          raise
    return ExportResult(final, number, info)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    if created_base and not os.listdir(model_dir):
      os.rmdir(model_dir)
    raise


def export_classifier(run_dir: str, support: support_lib.SupportSet, export_base: str,
                      model_name: Optional[str] = None, version: int = 0,
                      backbone=None, backbone_description: Optional[dict] = None,
                      restored: Optional[RestoredRun] = None,
                      private: bool = False) -> ExportResult:
  """Restores `run_dir`, adapts to `support` once and writes a new version.

  Everything is validated before anything is written; `private` makes the
  export readable by its owner only (see `write_version`).
  """
  restored = restored or restore_learner(run_lib.Run.open(run_dir))
  run = restored.run
  model_name = model_name or run.model
  check_model_name(model_name)
  crop = run_crop(run)
  module = AdaptedClassifier(restored.learner, support, backbone, backbone_description, crop)
  info = {
      "model": run.model, "run_dir": os.path.abspath(run.directory),
      "checkpoint": os.path.abspath(restored.checkpoint),
      "class_names": list(support.class_names), "num_ways": support.num_ways,
      "num_shots": support.num_shots, "embedding_dim": support.dim,
      "support": support.origin, "dtype": run.settings["dtype"],
      "run_settings": run.settings, "data_sha256": run.record.get("data", {}).get("sha256"),
      "backbone": ({k: backbone_description[k] for k in
                    ("backbone", "image_size", "channels", "invert", "feature_dim")
                    if k in backbone_description} if backbone is not None else None),
      "crop": crop if backbone is not None else None,
  }
  return write_version(module, export_base, model_name, version, info, private=private)


def read_export_info(export_dir: str) -> dict:
  with safeio.open_regular(os.path.join(export_dir, EXPORT_INFO)) as handle:
    return json.load(handle)
