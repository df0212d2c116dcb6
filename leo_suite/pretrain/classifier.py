"""The pretraining classifier: a backbone plus a linear or cosine head.

Also its teacher for distillation (`load_teacher`, `distillation_loss`) and
the export of its backbone (`export_backbone`, read back by
`leo_suite.models.backbones.load_backbone`).
"""

import dataclasses
import json
import os
import tempfile
from typing import Optional

import keras
import tensorflow as tf

from leo_suite import errors
from leo_suite import fileio
from leo_suite import safeio
from leo_suite.models import backbones
from leo_suite.pretrain.pretrain_config import PretrainConfig


class CosineHead(keras.layers.Layer):
  """scale * cos(feature, w_c) with a learnable scale from 10 (Baseline++ / CC)."""

  def __init__(self, num_classes, initial_scale=10.0, **kwargs):
    super().__init__(dtype="float32", **kwargs)
    self.num_classes = num_classes
    self.initial_scale = initial_scale

  def build(self, input_shape):
    self.kernel = self.add_weight(name="kernel", shape=(int(input_shape[-1]), self.num_classes),
                                  initializer="glorot_uniform")
    self.scale = self.add_weight(name="scale", shape=(),
                                 initializer=keras.initializers.Constant(self.initial_scale))

  def call(self, features):
    features = tf.math.l2_normalize(tf.cast(features, tf.float32), axis=-1)
    return self.scale * tf.matmul(features, tf.math.l2_normalize(self.kernel, axis=0))


def build_classifier(config: PretrainConfig, num_classes: int, mixed: bool = False,
                     synchronized_batch_norm: bool = False):
  """(backbone, classifier) where classifier = linear head over backbone features."""
  if mixed:
    keras.mixed_precision.set_global_policy("mixed_float16")
  try:
    backbone = backbones.build_backbone(config.backbone, config.image_size,
                                        config.channels, config.dropout,
                                        synchronized_batch_norm)
    inputs = keras.Input(backbone.input_shape[1:], name="images")
    features = backbone(inputs)
    if config.head == "cosine":
      logits = CosineHead(num_classes, name="head")(features)
    else:
      logits = keras.layers.Dense(num_classes, dtype="float32", name="head")(features)
  finally:
    if mixed:
      keras.mixed_precision.set_global_policy("float32")
  return backbone, keras.Model(inputs, logits, name="classifier")


def export_backbone(backbone: keras.Model, config: PretrainConfig, export_dir: str,
                    extra: Optional[dict] = None) -> dict:
  """Writes backbone.weights.h5 (atomically) and backbone.json; returns the json."""
  os.makedirs(export_dir, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix="tmp-", suffix=".weights.h5", dir=export_dir)
  os.close(fd)
  try:
    backbone.save_weights(tmp, overwrite=True)
    os.replace(tmp, os.path.join(export_dir, backbones.BACKBONE_WEIGHTS))
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  description = {
      "backbone": config.backbone, "image_size": config.image_size,
      "channels": config.channels, "invert": config.invert,
      "dropout": config.dropout,
      "feature_dim": int(backbone.output_shape[-1]),
      "parameters": backbones.count_parameters(backbone),
      "weights_sha256": fileio.file_sha256(os.path.join(export_dir, backbones.BACKBONE_WEIGHTS)),
  }
  description.update(extra or {})
  fileio.atomic_write_text(os.path.join(export_dir, backbones.BACKBONE_CONFIG),
                           json.dumps(description, indent=2, sort_keys=True))
  return description


def distillation_loss(student_logits, teacher_logits, temperature: float):
  """T^2 * mean over the batch of KL(softmax(teacher / T) || softmax(student / T)).

  The T^2 keeps the soft term's gradient on the scale of the hard one
  (Hinton et al. 2015, section 2).
  """
  t = tf.cast(temperature, tf.float32)
  log_teacher = tf.nn.log_softmax(tf.cast(teacher_logits, tf.float32) / t)
  log_student = tf.nn.log_softmax(tf.cast(student_logits, tf.float32) / t)
  return t * t * tf.reduce_mean(
      tf.reduce_sum(tf.exp(log_teacher) * (log_teacher - log_student), axis=-1))


def load_teacher(run_dir: str, num_classes: int, image_size: int, channels: int):
  """(classifier, description) of a finished pretraining run in `run_dir`.

  The teacher is the run's last checkpoint (backbone and head); it must have
  finished its schedule and classify the same `num_classes` classes.
  """
  config_path = os.path.join(run_dir, "checkpoints", "pretrain_config.json")
  latest = tf.train.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
  if not os.path.exists(config_path) or not latest:
    raise errors.ConfigError(
        f"--teacher={run_dir}: no pretraining checkpoints there (expected "
        f"{config_path} and a checkpoint); pass the --out_dir of a finished scripts/pretrain.py run")
  try:
    with safeio.open_regular(config_path, error=errors.ConfigError) as handle:
      saved = json.load(handle)
    teacher_config = PretrainConfig(**{k: v for k, v in saved["config"].items()
                                       if k in {f.name for f in dataclasses.fields(PretrainConfig)}})
  except (json.JSONDecodeError, KeyError, TypeError) as exc:
    raise errors.ConfigError(f"{config_path}: malformed pretraining config ({exc})") from None
  if saved.get("num_classes") != num_classes:
    raise errors.ConfigError(
        f"--teacher={run_dir} classifies {saved.get('num_classes')} classes, this run "
        f"{num_classes}; distil from a teacher trained on the same classes")
  if (teacher_config.image_size, teacher_config.channels) != (image_size, channels):
    raise errors.ConfigError(
        f"--teacher={run_dir} takes {teacher_config.image_size}x{teacher_config.image_size}x"
        f"{teacher_config.channels} images, this run {image_size}x{image_size}x{channels}")
  steps_per_epoch = saved.get("num_images", 0) // teacher_config.batch_size
  step = int(latest.rsplit("-", 1)[-1])
  if step < steps_per_epoch * teacher_config.epochs:
    raise errors.ConfigError(
        f"--teacher={run_dir} stopped at step {step} of {steps_per_epoch * teacher_config.epochs}; "
        "finish its pretraining first (rerun it to resume)")
  _, classifier = build_classifier(dataclasses.replace(teacher_config, dropout=0.0), num_classes)
  tf.train.Checkpoint(classifier=classifier).restore(latest).expect_partial()
  classifier.trainable = False
  description = {"run_dir": os.path.abspath(run_dir), "checkpoint": os.path.basename(latest),
                 "checkpoint_sha256": fileio.file_sha256(latest + ".index"),
                 "config": dataclasses.asdict(teacher_config)}
  return classifier, description
