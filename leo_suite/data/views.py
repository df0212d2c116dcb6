"""Per-view embeddings of a split, and meta-training episodes that draw views.

`<data_path>/<dataset>/<crop>/<split>_views.npz` holds `keys` (the split
file's keys) and `embeddings` [n, V, D]: each image's V views (for the warps
crop, the image and its 15 fixed affine warps) embedded one at a time, whose
mean is the image's row in the split file. Extraction writes it for the
splits named by `--view_splits` (`leo_suite.pretrain.extract`).

With `--metatrain_views=M` every meta-training task shows each of its images
as the mean of M of its V views, drawn afresh per task (`ViewEpisodeSampler`):
the same drawings, a new feature realisation at every step. Validation and
test episodes keep the averaged rows. With M = V a task is the averaged
sampler's task.
"""

import hashlib
import io
import os
from typing import Optional, Tuple

import numpy as np
import tensorflow as tf

from leo_suite import errors
from leo_suite import fileio
from leo_suite.data import embeddings as embeddings_lib
from leo_suite.data.embedding_keys import parse_key
from leo_suite.data.episodes import EpisodeSampler
from leo_suite.data.episodes import smallest
from leo_suite.data.episodes import task_seed
from leo_suite.data.safe_arrays import shorten

VIEWS_SUFFIX = "_views.npz"
VIEW_SALT = 0x76696577   # "view": the view draws' stream, apart from the task's draws
# A view file's mean may differ from the split's rows by float32 rounding only.
MEAN_TOLERANCE = 1e-4


def views_path(data_path: str, dataset_name: str, crop: str, split: str) -> str:
  """`<data_path>/<dataset_name>/<crop>/<split>_views.npz` (names checked as the split's)."""
  folder = os.path.dirname(embeddings_lib.split_path(data_path, dataset_name, crop, split))
  return os.path.join(folder, split + VIEWS_SUFFIX)


def write_views(path: str, keys, views: np.ndarray):
  """Writes a views file atomically (`keys` as the split file's, views [n, V, D])."""
  views = np.asarray(views, np.float32)
  keys = [str(k) for k in keys]
  if views.ndim != 3 or views.shape[0] != len(keys):
    raise ValueError(f"need n keys and an (n, V, D) array, got {len(keys)} and {views.shape}")
  buffer = io.BytesIO()
  np.savez(buffer, keys=np.asarray(keys, dtype=np.str_), embeddings=views)
  fileio.atomic_write_bytes(path, buffer.getvalue())


def load_views(path: str, split: embeddings_lib.EmbeddingSplit, views_per_image: int,
               max_bytes: Optional[int] = None) -> Tuple[np.ndarray, str]:
  """(views [n, V, D] float32 in `split`'s row order, the file's sha256).

  Checked before use: a regular file within the memory cap, the split's
  images exactly (by class and file name), D as the split's, finite values,
  at least `views_per_image` views, and each image's mean view equal to its
  row in the split (so the file comes from the same extraction)."""
  if not os.path.lexists(path):
    raise errors.DataError(
        f"{path}: no such file. --metatrain_views needs each training image's views beside "
        "its split file: extract with --view_splits=train (scripts/extract_embeddings.py), "
        "or run the Omniglot pipeline with --metatrain_views")
  return embeddings_lib.guarded(
      path, lambda p, cap: _read_views(p, cap, split, views_per_image), max_bytes,
      shape="an n x V x D")


def _read_views(path, cap, split, views_per_image):
  raw_keys, raw, payload = embeddings_lib.read_raw(path, cap)
  if not isinstance(raw, np.ndarray) or raw.dtype.kind != "f" or raw.ndim != 3:
    raise errors.DataError(
        f"{path}: 'embeddings' is {shorten(getattr(raw, 'shape', type(raw).__name__))}, "
        "expected a float array of shape (n, V, D)")
  if raw.shape[2] != split.dim or raw.shape[1] < 1:
    raise errors.DataError(f"{path}: 'embeddings' has shape {raw.shape}, expected "
                           f"(n, V, {split.dim}) with V >= 1 (the split's width D)")
  raw_keys = raw_keys.tolist() if isinstance(raw_keys, np.ndarray) and raw_keys.ndim == 1 \
      else raw_keys
  if not isinstance(raw_keys, list) or len(raw_keys) != raw.shape[0]:
    raise errors.DataError(f"{path}: 'keys' must be a list of one key per image "
                           f"({raw.shape[0]} images)")
  views = raw.astype(np.float32)
  if not np.isfinite(views).all():
    bad = int(np.flatnonzero(~np.isfinite(views).all(axis=(1, 2)))[0])
    raise errors.DataError(f"{path}: image {bad}'s views hold NaN or inf; extract again")
  position, classes = {}, []
  for index, key in enumerate(raw_keys):
    class_name, image_file = parse_key(embeddings_lib.decode_key(key, path, index), path, index)
    position.setdefault(image_file, index)
    classes.append(class_name)
  source = ", ".join(split.source) or "the split"
  row_classes = np.repeat(np.asarray(split.class_names, dtype=object), split.class_count)
  if len(position) != len(raw_keys) or set(position) != set(split.image_names) or any(
      classes[position[name]] != row_class
      for name, row_class in zip(split.image_names, row_classes)):
    raise errors.DataError(
        f"{path}: its images are not those of {source} (classes or file names differ); the "
        "views come from another extraction: extract both again in one run")
  views = views[np.asarray([position[name] for name in split.image_names], np.int64)]
  scale = np.abs(split.embeddings).max(axis=1, keepdims=True) + 1e-12
  worst = float((np.abs(views.mean(axis=1) - split.embeddings) / scale).max())
  if worst > MEAN_TOLERANCE:
    raise errors.DataError(
        f"{path}: an image's mean view differs from its row in {source} by {worst:.2g} of "
        "the row's largest value; the views come from another backbone or crop: extract "
        "both again in one run")
  if views_per_image > views.shape[1]:
    raise errors.ConfigError(
        f"--metatrain_views={views_per_image} but {path} holds "
        f"{views.shape[1]} views per image: use at most that many")
  return views, hashlib.sha256(payload).hexdigest()


class ViewEpisodeSampler(EpisodeSampler):
  """`EpisodeSampler` whose tasks show each image as the mean of `views_per_image`
  of its views, drawn per task from (seed, index) apart from the task's classes
  and images, which are the averaged sampler's draws."""

  def __init__(self, split, spec, views: np.ndarray, views_per_image: int,
               what="episodes", dtype=tf.float32):
    super().__init__(split, spec, what, dtype)
    count, num_views, dim = views.shape
    if not 1 <= views_per_image <= num_views:
      raise errors.ConfigError(f"--metatrain_views={views_per_image}: use 1 to {num_views}")
    self.views_per_image = views_per_image
    self._num_views = num_views
    self._view_table = tf.Variable(views.reshape(count * num_views, dim), trainable=False,
                                   name="views")

  def task_images(self, seed, index, rows):
    """The unit mean of `views_per_image` distinct views of each of `rows` [N, K+V]."""
    view_seed = tf.random.experimental.stateless_fold_in(task_seed(seed, index), VIEW_SALT)
    keys = tf.random.stateless_uniform(
        tf.concat([tf.shape(rows), [self._num_views]], 0), view_seed)
    chosen = tf.cast(smallest(keys, self.views_per_image), tf.int64)   # [N, K+V, M]
    drawn = tf.gather(self._view_table, rows[..., tf.newaxis] * self._num_views + chosen)
    mean = tf.reduce_mean(drawn, axis=-2)                               # [N, K+V, D]
    norms = tf.norm(mean, axis=-1, keepdims=True)
    return tf.cast(mean / tf.maximum(norms, 1e-6), self.dtype)
