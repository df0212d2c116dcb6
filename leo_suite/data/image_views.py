"""Decoded pixels -> backbone inputs: scaling, views (crops), warps, augmentation.

`preprocess` scales uint8 images to [0, 1] (inverted for Omniglot's strokes);
`embed` runs a backbone on the views of a crop and averages their features,
the same way at extraction and in exported models:

  center     the whole image resized to image_size x image_size (the single
             central view, as during pretraining);
  multiview  the image resized to round(image_size * 8 / 7) (28 -> 32,
             84 -> 96); the four corner crops and the central crop of
             image_size, each also flipped left-right: 10 views whose
             features are averaged (LEO's "multiview", as its appendix
             describes it);
  warps      the center view and 15 fixed Koch affine warps of it (the
             pretraining augmentation, `affine_transforms`, drawn once
             from WARP_SEED: every image gets the same 15), features
             averaged. For characters, where flips change the class. Chosen
             on the Omniglot meta-val alphabets (docs/results.md, Omniglot-small;
             cosine NCM, 5w1s / 5w5s / 20w1s, 1,000 fixed episodes): center
             96.91 / 98.92 / 89.78; random per-image warps averaged over 4,
             8 and 16 views 97.21 / 98.95 / 90.29, 97.31 / 98.98 / 90.68,
             97.37 / 99.00 / 90.84; these 16 fixed views 97.44 / 99.02 / 91.08.
             The warps do not depend on the other images of a batch (only
             float rounding does: about 1e-7 for batches of 1-2 images).

Pretraining's augmentation (`augment_batch`: translations, flips, Koch et
al.'s 2015 affine warps; `rotated_copies`: rotations as new classes) is
stateless: the same (batch, seed) always gives the same images.
"""

import numpy as np
import tensorflow as tf

CROPS = ("center", "multiview", "warps")
WARP_VIEWS = 16          # the center view + 15 warps
WARP_SEED = (2015, 7)    # Koch et al. 2015; any fixed seed: every image gets the same warps
WARP_MAX_SHIFT = 2.0     # pixels at 28 x 28, as in pretraining
CROP_DESCRIPTIONS = {
    "center": "whole image resized to image_size (one central view)",
    "multiview": "resized to round(image_size*8/7); 4 corner + center crops of "
                 "image_size and their left-right flips (10 views), features averaged",
    "warps": f"whole image resized to image_size, plus {WARP_VIEWS - 1} fixed Koch affine "
             f"warps of it (seed {list(WARP_SEED)}, max shift {WARP_MAX_SHIFT:g} px), "
             f"{WARP_VIEWS} views, features averaged",
}


def preprocess(images_uint8, invert: bool):
  """uint8 [..., S, S, C] -> float32 in [0, 1]; Omniglot strokes inverted (1 - x)."""
  x = tf.cast(images_uint8, tf.float32) / 255.0
  return 1.0 - x if invert else x


def rotated_copies(images: np.ndarray, labels: np.ndarray):
  """Rotations by k*90 degrees as new classes: label 4 * y + k (k = 0..3)."""
  xs = [np.rot90(images, k, axes=(1, 2)) for k in range(4)]
  ys = [4 * labels + k for k in range(4)]
  return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys).astype(np.int32)


def _rows(draw, batch, rows):
  """`draw(n)` (n leading rows) for a batch: rows offset .. offset + batch - 1 of
  the draw for the whole batch of `total` when `rows` = (offset, total)."""
  if rows is None:
    return draw(batch)
  offset, total = rows
  offset = tf.cast(offset, tf.int32)
  return draw(total)[offset:offset + tf.cast(batch, tf.int32)]


def augment_batch(x, seed, augment: str, max_shift: int, rows=None):
  """Random translation by up to `max_shift` pixels (zero padding), optional flips.

  Stateless: the same (batch, seed) always gives the same result. `rows` =
  (offset, total): `x` is rows offset.. of a batch of `total` images, and each
  image gets the draw it gets in that batch (a replica's share of a step).
  """
  if augment == "none" or (augment == "shift" and max_shift <= 0):
    return x
  if augment == "affine":
    return affine_batch(x, seed, max_shift, rows)
  batch = tf.shape(x)[0]
  size = x.shape[1]
  if max_shift > 0:
    padded = tf.pad(x, [[0, 0], [max_shift, max_shift], [max_shift, max_shift], [0, 0]])
    span = size + 2 * max_shift - 1
    offsets = _rows(lambda n: tf.random.stateless_uniform(
        [n, 2], seed, 0, 2 * max_shift + 1, tf.int32), batch, rows)
    offsets = tf.cast(offsets, tf.float32)
    boxes = tf.concat([offsets, offsets + (size - 1)], axis=1) / span
    boxes = tf.gather(boxes, [0, 1, 2, 3], axis=1)  # (y1, x1, y2, x2)
    x = tf.image.crop_and_resize(padded, boxes, tf.range(batch), [size, size])
  if augment == "shift_flip":
    flip_seed = tf.random.experimental.stateless_fold_in(seed, 1)
    flip = _rows(lambda n: tf.random.stateless_uniform([n, 1, 1, 1], flip_seed),
                 batch, rows) < 0.5
    x = tf.where(flip, tf.reverse(x, axis=[2]), x)
  return x


def affine_transforms(count, seed, size: int, max_shift: float, rotation_deg: float = 10.0,
                      shear: float = 0.3, scale: tuple = (0.8, 1.2)):
  """[count, 8] projective transforms of Koch et al.'s (2015) affine warp (stateless).

  Rotation +-10 degrees, shears rho_x, rho_y in [-0.3, 0.3], scales s_x, s_y in
  [0.8, 1.2] and a translation of up to `max_shift` pixels; each component is
  applied with probability 0.5. Each row maps output to input coordinates
  around the centre of a `size` x `size` image (the distribution of each
  component is symmetric).
  """
  u = tf.random.stateless_uniform([count, 7], seed, -1.0, 1.0)
  on = tf.cast(tf.random.stateless_uniform(
      [count, 4], tf.random.experimental.stateless_fold_in(seed, 2)) < 0.5, tf.float32)
  theta = on[:, 0] * u[:, 0] * rotation_deg * np.pi / 180.0
  rho_x, rho_y = on[:, 1] * u[:, 1] * shear, on[:, 1] * u[:, 2] * shear
  mid, half = (scale[0] + scale[1]) / 2, (scale[1] - scale[0]) / 2
  s_x = 1.0 + on[:, 2] * (mid + half * u[:, 3] - 1.0)
  s_y = 1.0 + on[:, 2] * (mid + half * u[:, 4] - 1.0)
  t_x, t_y = on[:, 3] * u[:, 5] * max_shift, on[:, 3] * u[:, 6] * max_shift
  cos, sin = tf.cos(theta), tf.sin(theta)
  # M = R(theta) @ [[1, rho_x], [rho_y, 1]] @ diag(s_x, s_y)
  m00 = (cos - sin * rho_y) * s_x
  m01 = (cos * rho_x - sin) * s_y
  m10 = (sin + cos * rho_y) * s_x
  m11 = (sin * rho_x + cos) * s_y
  c = (size - 1) / 2.0
  return tf.stack([m00, m01, c + t_x - m00 * c - m01 * c,
                   m10, m11, c + t_y - m10 * c - m11 * c,
                   tf.zeros_like(m00), tf.zeros_like(m00)], axis=1)


def warp(x, transforms):
  """Images [B, S, S, C] warped by transforms [B, 8] (bilinear, zero fill:
  strokes are already inverted to 1 on 0)."""
  return tf.raw_ops.ImageProjectiveTransformV3(
      images=x, transforms=transforms, output_shape=tf.shape(x)[1:3],
      fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")


def affine_batch(x, seed, max_shift: float, rows=None):
  """Each image of the batch under its own random Koch affine warp."""
  return warp(x, _rows(lambda n: affine_transforms(n, seed, x.shape[1], max_shift),
                       tf.shape(x)[0], rows))


def multiview_size(image_size: int) -> int:
  return int(round(image_size * 8 / 7))


def load_size(crop: str, image_size: int) -> int:
  """The size images are decoded to before `make_views`."""
  return multiview_size(image_size) if crop == "multiview" else image_size


def warp_views(x):
  """[B, S, S, C] -> [B * WARP_VIEWS, S, S, C]: x, then the fixed warps of x."""
  batch = tf.shape(x)[0]
  transforms = affine_transforms(WARP_VIEWS - 1, tf.constant(WARP_SEED, tf.int32),
                                 x.shape[1], WARP_MAX_SHIFT)
  views = [x] + [warp(x, tf.tile(transforms[v:v + 1], [batch, 1]))
                 for v in range(WARP_VIEWS - 1)]
  return tf.reshape(tf.stack(views, axis=1), [-1, *x.shape[1:]])


def make_views(x, crop: str, image_size: int):
  """[B, S', S', C] -> [B * views, S, S, C] (views of an image contiguous)."""
  if crop == "center":
    return x
  if crop == "warps":
    return warp_views(x)
  big = x.shape[1]
  margin = big - image_size
  offsets = [(0, 0), (0, margin), (margin, 0), (margin, margin),
             (margin // 2, margin // 2)]
  views = [x[:, dy:dy + image_size, dx:dx + image_size, :] for dy, dx in offsets]
  views += [tf.reverse(v, axis=[2]) for v in views]
  stacked = tf.stack(views, axis=1)                             # [B, 10, S, S, C]
  return tf.reshape(stacked, [-1, image_size, image_size, x.shape[-1]])


def num_views(crop: str) -> int:
  return {"center": 1, "multiview": 10, "warps": WARP_VIEWS}[crop]


def view_features(model, batch_uint8, crop: str, image_size: int, invert: bool):
  """uint8 images [B, S', S', C] -> float32 features of each view [B, views, D]."""
  x = preprocess(batch_uint8, invert)
  flat = tf.cast(model(make_views(x, crop, image_size), training=False), tf.float32)
  return tf.reshape(flat, [-1, num_views(crop), flat.shape[-1]])


def embed(model, batch_uint8, crop: str, image_size: int, invert: bool):
  """uint8 images [B, S', S', C] -> float32 features [B, D] (views averaged).

  Exported models with a bundled backbone call it too (crop "center").
  """
  return tf.reduce_mean(view_features(model, batch_uint8, crop, image_size, invert), axis=1)


def embed_with_views(model, batch_uint8, crop: str, image_size: int, invert: bool):
  """[B, (1 + views) D]: `embed`'s averaged features, then each view's, side by side."""
  per_view = view_features(model, batch_uint8, crop, image_size, invert)
  flat = tf.reshape(per_view, [-1, per_view.shape[1] * per_view.shape[2]])
  return tf.concat([tf.reduce_mean(per_view, axis=1), flat], axis=1)


def feature_function(model, crop: str, image_size: int, invert: bool, with_views=False):
  """tf.function: uint8 images [B, S', S', C] -> float32 features [B, D]
  (`with_views`: [B, (1 + views) D], `embed_with_views`)."""
  fn = embed_with_views if with_views else embed
  return tf.function(lambda batch: fn(model, batch, crop, image_size, invert),
                     reduce_retracing=True, autograph=False)
