"""Feature backbones (Keras 3 functional models): Conv-4, ResNet-12, WRN-28-10.

Every builder returns a `keras.Model` mapping images [batch, S, S, C] (float,
already preprocessed) to features [batch, D]:

  conv4      4 x [3x3 conv 64 (bias), BN, ReLU, 2x2 max-pool], flattened
             (D = 64 at 28x28, 1600 at 84x84). 113,088 trainable parameters
             for C = 3 (Vinyals et al. 2016; Snell et al. 2017).
  conv4_wide the same with widths 64-96-128-256 (D = 256 at 28x28): the
             extra width sits where the maps are small (Omniglot validation,
             README).
  conv4_map  conv4 without the last block's pool (D = 576 at 28x28).
  resnet12   4 residual blocks of 3 x [3x3 conv, BN, leaky ReLU 0.1] with a
             1x1 conv + BN shortcut and 2x2 max-pool, widths 64-160-320-640,
             global average pool: D = 640, ~12.42 M parameters (Lee et al.
             2019, MetaOptNet; Tian et al. 2020, RFS).
  wrn28_10   Wide ResNet depth 28, widen 10 (Zagoruyko & Komodakis 2016):
             pre-activation blocks, widths 160-320-640, strides 1-2-2, final
             BN + ReLU + global average pool: D = 640, ~36.47 M parameters
             (the 640-d features LEO's embeddings come from).

Parameter counts are trainable parameters (conv/dense weights and biases, BN
gamma and beta; BN moving statistics are not parameters). No classifier head
is included: `leo_suite.pretrain.classifier` adds one.

A trained backbone is exported as `backbone.weights.h5` + `backbone.json`
(`leo_suite.pretrain.classifier.export_backbone`) and read back, its sha256
checked, by `load_backbone`.
"""

import functools
import json
import os

import keras

from leo_suite import errors
from leo_suite import fileio
from leo_suite import safeio

BACKBONE_WEIGHTS = "backbone.weights.h5"
BACKBONE_CONFIG = "backbone.json"
BACKBONES = ("conv4", "conv4_wide", "conv4_map", "resnet12", "wrn28_10")


def _conv4(inputs, bn, widths=(64, 64, 64, 64), last_pool=True):
  h = inputs
  for block, width in enumerate(widths):
    h = keras.layers.Conv2D(width, 3, padding="same", name=f"conv{block}")(h)
    h = bn(name=f"bn{block}")(h)
    h = keras.layers.ReLU(name=f"relu{block}")(h)
    if last_pool or block < len(widths) - 1:
      h = keras.layers.MaxPooling2D(2, name=f"pool{block}")(h)
  return keras.layers.Flatten(name="features")(h)


def _resnet12_block(h, width, name, bn):
  shortcut = keras.layers.Conv2D(width, 1, use_bias=False, name=f"{name}_short")(h)
  shortcut = bn(name=f"{name}_short_bn")(shortcut)
  for conv in range(3):
    h = keras.layers.Conv2D(width, 3, padding="same", use_bias=False,
                            name=f"{name}_conv{conv}")(h)
    h = bn(name=f"{name}_bn{conv}")(h)
    if conv < 2:
      h = keras.layers.LeakyReLU(0.1, name=f"{name}_act{conv}")(h)
  h = keras.layers.Add(name=f"{name}_add")([h, shortcut])
  h = keras.layers.LeakyReLU(0.1, name=f"{name}_out")(h)
  return keras.layers.MaxPooling2D(2, name=f"{name}_pool")(h)


def _resnet12(inputs, bn, dropout=0.0):
  h = inputs
  for index, width in enumerate((64, 160, 320, 640)):
    h = _resnet12_block(h, width, f"block{index}", bn)
    if dropout and index >= 2:
      h = keras.layers.Dropout(dropout, name=f"block{index}_drop")(h)
  return keras.layers.GlobalAveragePooling2D(name="features")(h)


def _wrn_block(h, width, stride, dropout, name, bn):
  """Pre-activation wide basic block: BN-ReLU-conv3x3-(dropout)-BN-ReLU-conv3x3."""
  in_width = h.shape[-1]
  pre = bn(name=f"{name}_bn0")(h)
  pre = keras.layers.ReLU(name=f"{name}_relu0")(pre)
  out = keras.layers.Conv2D(width, 3, strides=stride, padding="same",
                            use_bias=False, name=f"{name}_conv0")(pre)
  out = bn(name=f"{name}_bn1")(out)
  out = keras.layers.ReLU(name=f"{name}_relu1")(out)
  if dropout:
    out = keras.layers.Dropout(dropout, name=f"{name}_drop")(out)
  out = keras.layers.Conv2D(width, 3, padding="same", use_bias=False,
                            name=f"{name}_conv1")(out)
  if in_width != width or stride != 1:
    shortcut = keras.layers.Conv2D(width, 1, strides=stride, use_bias=False,
                                   name=f"{name}_short")(pre)
  else:
    shortcut = h
  return keras.layers.Add(name=f"{name}_add")([out, shortcut])


def _wrn(inputs, bn, depth=28, widen=10, dropout=0.0):
  blocks_per_group = (depth - 4) // 6
  h = keras.layers.Conv2D(16, 3, padding="same", use_bias=False, name="stem")(inputs)
  for group, (width, stride) in enumerate(
      ((16 * widen, 1), (32 * widen, 2), (64 * widen, 2))):
    for block in range(blocks_per_group):
      h = _wrn_block(h, width, stride if block == 0 else 1, dropout,
                     f"group{group}_block{block}", bn)
  h = bn(name="final_bn")(h)
  h = keras.layers.ReLU(name="final_relu")(h)
  return keras.layers.GlobalAveragePooling2D(name="features")(h)


def build_backbone(name: str, image_size: int, channels: int = 3,
                   dropout: float = 0.0, synchronized_batch_norm: bool = False) -> keras.Model:
  """Builds backbone `name` for square inputs [batch, image_size, image_size, channels].

  `synchronized_batch_norm`: in training, every BatchNormalization layer
  normalises with the statistics of the global batch, all-reduced over the
  replicas of a tf.distribute strategy (Keras `synchronized=True`; the same
  weights, so a backbone trained this way loads into a default one).
  """
  if name not in BACKBONES:
    raise ValueError(f"unknown backbone {name!r}; choose one of {list(BACKBONES)}")
  if image_size < 16:
    raise ValueError(f"image_size {image_size} is too small (need >= 16)")
  inputs = keras.Input((image_size, image_size, channels), name="images")
  bn = functools.partial(keras.layers.BatchNormalization, synchronized=synchronized_batch_norm)
  if name == "conv4":
    features = _conv4(inputs, bn)
  elif name == "conv4_wide":
    features = _conv4(inputs, bn, widths=(64, 96, 128, 256))
  elif name == "conv4_map":
    features = _conv4(inputs, bn, last_pool=False)
  elif name == "resnet12":
    features = _resnet12(inputs, bn, dropout)
  else:
    features = _wrn(inputs, bn, dropout=dropout)
  return keras.Model(inputs, features, name=name)


def count_parameters(model: keras.Model) -> int:
  """Trainable parameters (weights, biases, BN gamma/beta)."""
  total = 0
  for variable in model.trainable_weights:
    size = 1
    for dim in variable.shape:
      size *= int(dim)
    total += size
  return total


def parameter_table(image_size: int, channels: int = 3):
  """[(name, trainable parameters, feature dimension)] for every backbone."""
  rows = []
  for name in BACKBONES:
    model = build_backbone(name, image_size, channels)
    rows.append((name, count_parameters(model), int(model.output_shape[-1])))
    keras.backend.clear_session()
  return rows


def load_backbone(export_dir: str):
  """(backbone model, description) from an `export_backbone` directory."""
  config_path = os.path.join(export_dir, BACKBONE_CONFIG)
  weights_path = os.path.join(export_dir, BACKBONE_WEIGHTS)
  for path in (config_path, weights_path):
    if not os.path.exists(path):
      raise errors.DataError(
          f"{path}: no such file; pass the backbone/ folder written by scripts/pretrain.py")
  try:
    with safeio.open_regular(config_path) as handle:   # a regular file under the cap
      description = json.load(handle)
    model = build_backbone(description["backbone"], int(description["image_size"]),
                           int(description["channels"]),
                           float(description.get("dropout", 0.0)))
  except (json.JSONDecodeError, KeyError, ValueError, TypeError) as exc:
    raise errors.DataError(f"{config_path}: malformed backbone description ({exc})") from None
  sha = fileio.file_sha256(weights_path)
  if description.get("weights_sha256") not in (None, sha):
    raise errors.DataError(
        f"{weights_path}: sha256 {sha[:12]}... does not match {config_path} "
        f"({description['weights_sha256'][:12]}...); the weights were changed or truncated")
  try:
    model.load_weights(weights_path)
  except Exception as exc:  # h5py / shape errors
    raise errors.DataError(
        f"{weights_path}: cannot load the {description['backbone']} weights "
        f"({type(exc).__name__}: {exc})") from None
  description["weights_sha256"] = sha
  return model, description
