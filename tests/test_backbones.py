"""Backbones: parameter counts from the architectures' arithmetic, feature shapes."""

import os
import sys

import numpy as np
import pytest
import tensorflow as tf

from leo_suite.models import backbones

from tests import scripts_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _conv(k, c_in, c_out, bias=False):
  return k * k * c_in * c_out + (c_out if bias else 0)


def _bn(c):
  return 2 * c  # gamma, beta (moving statistics are not trainable parameters)


def conv4_count(channels, widths=(64, 64, 64, 64)):
  count, c_in = 0, channels
  for width in widths:
    count += _conv(3, c_in, width, bias=True) + _bn(width)
    c_in = width
  return count


def resnet12_count(channels=3):
  count, c_in = 0, channels
  for width in (64, 160, 320, 640):
    count += _conv(3, c_in, width) + 2 * _conv(3, width, width) + 3 * _bn(width)
    count += _conv(1, c_in, width) + _bn(width)  # shortcut
    c_in = width
  return count


def wrn_count(depth=28, widen=10, channels=3):
  count, c_in = _conv(3, channels, 16), 16
  for width in (16 * widen, 32 * widen, 64 * widen):
    for block in range((depth - 4) // 6):
      count += _bn(c_in) + _conv(3, c_in, width) + _bn(width) + _conv(3, width, width)
      if block == 0:
        count += _conv(1, c_in, width)  # every group changes width
      c_in = width
  return count + _bn(c_in)


def test_conv4_matches_the_reference_count_and_shapes():
  model = backbones.build_backbone("conv4", 84, 3)
  assert backbones.count_parameters(model) == conv4_count(3) == 113_088
  assert model.output_shape == (None, 1600)  # 64 x 5 x 5 at 84x84
  omniglot = backbones.build_backbone("conv4", 28, 1)
  assert backbones.count_parameters(omniglot) == conv4_count(1) == 111_936
  features = omniglot(tf.random.uniform([3, 28, 28, 1]), training=False)
  assert features.shape == (3, 64)  # 28 -> 14 -> 7 -> 3 -> 1


def test_conv4_variants_counts_and_feature_sizes():
  wide = backbones.build_backbone("conv4_wide", 28, 1)
  assert backbones.count_parameters(wide) == conv4_count(1, (64, 96, 128, 256)) == 463_008
  assert wide.output_shape == (None, 256)  # 256 x 1 x 1
  flat = backbones.build_backbone("conv4_map", 28, 1)
  assert backbones.count_parameters(flat) == conv4_count(1) == 111_936
  assert flat.output_shape == (None, 576)  # 64 x 3 x 3: no last pool
  x = tf.random.uniform([2, 28, 28, 1], seed=3)
  # The map variant's features, max-pooled over the 3x3 map (2x2 window, top-left),
  # are conv4's features with the same weights.
  plain = backbones.build_backbone("conv4", 28, 1)
  plain.set_weights(flat.get_weights())
  maps = tf.reshape(flat(x, training=False), [2, 3, 3, 64])
  pooled = tf.reduce_max(maps[:, :2, :2, :], axis=[1, 2])
  np.testing.assert_allclose(pooled.numpy(), plain(x, training=False).numpy(), rtol=1e-5,
                             atol=1e-6)


def test_resnet12_count_and_640d_features_at_84():
  model = backbones.build_backbone("resnet12", 84, 3)
  count = backbones.count_parameters(model)
  assert count == resnet12_count(3)
  assert abs(count - 12.42e6) / 12.42e6 < 0.001  # notes: ~12.42 M
  features = model(tf.random.uniform([2, 84, 84, 3]), training=False)
  assert features.shape == (2, 640)
  # Global average pooling of a post-ReLU-free (leaky) map: finite, input-dependent.
  assert np.isfinite(features.numpy()).all()
  assert not np.allclose(features[0], features[1])


def test_wrn28_10_count_and_640d_features():
  model = backbones.build_backbone("wrn28_10", 32, 3)
  count = backbones.count_parameters(model)
  assert count == wrn_count()
  assert abs(count - 36.47e6) / 36.47e6 < 0.001  # notes: ~36.47 M
  assert model.output_shape == (None, 640)


def test_features_are_batch_independent_in_inference():
  model = backbones.build_backbone("conv4", 28, 1)
  x = tf.random.uniform([4, 28, 28, 1], seed=1)
  together = model(x, training=False).numpy()
  alone = np.concatenate([model(x[i:i + 1], training=False).numpy() for i in range(4)])
  np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)


def test_unknown_backbone_and_tiny_input_are_rejected():
  with pytest.raises(ValueError, match="unknown backbone 'vgg'"):
    backbones.build_backbone("vgg", 84)
  with pytest.raises(ValueError, match="too small"):
    backbones.build_backbone("conv4", 8)


def test_print_params_cli():
  proc = scripts_run.run(
      [sys.executable, os.path.join(REPO, "scripts", "pretrain.py"), "--print_params",
       "--image_size=84", "--channels=3"],
      capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()[1:]}
  assert lines["conv4"] == ["113,088", "1600"]
  assert lines["resnet12"] == [f"{resnet12_count():,}", "640"]
  assert lines["wrn28_10"] == [f"{wrn_count():,}", "640"]
