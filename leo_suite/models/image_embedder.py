"""Images -> embeddings with a pretrained backbone, as extraction computes them.

`ImageEmbedder` is the one way images become embeddings: the backbone of a
pretraining run (`backbones.load_backbone`), `images.decode_encoded` and
`image_views.embed` through `extract_split`. Split extraction
(`leo_suite.pretrain.extract`), whole-source extraction and support and query
sets (`leo_suite.serving.sets`) all use it.
"""

from typing import Callable, List, Optional, Sequence

import numpy as np
import tensorflow as tf

from leo_suite import errors
from leo_suite import progress as progress_lib
from leo_suite.data import image_sources
from leo_suite.data import image_views
from leo_suite.data import images as images_lib
from leo_suite.models.backbones import load_backbone


def _image_dataset(records, options: images_lib.DecodeOptions, decoder, batch_size,
                   failures: list):
  """Batches of (record index, uint8 image); a DataError ends it into `failures`.

  (tf.data would otherwise wrap the error into an opaque InvalidArgumentError.)
  """
  size, channels = options.image_size, options.channels

  def generate():
    try:
      for index, array in decoder.iterate(records):
        yield index, array
    except errors.DataError as exc:
      failures.append(exc)
  return (tf.data.Dataset.from_generator(
      generate, output_signature=(
          tf.TensorSpec([], tf.int64),
          tf.TensorSpec([size, size, channels], tf.uint8)))
          .batch(batch_size).prefetch(2))


def extract_split(features_fn, records: List[image_sources.ImageRecord],
                  options: images_lib.DecodeOptions, batch_size: int,
                  label: str, log: Callable[[str], None] = print,
                  log_every_s: float = 5.0, empty_dim: Optional[int] = None):
  """Features [n_kept, D] float32, kept record indices, skipped (origin, reason).

  No decodable image is an error, unless `empty_dim` is given (a shard may
  hold no image, or only bad ones, of a split): then [0, empty_dim] features.
  """
  decoder = images_lib.Decoder(options)
  kept, chunks = [], []
  progress = progress_lib.Progress(label, len(records), unit="images",
                                   interval_s=log_every_s, log=log)
  failures = []
  for indices, batch in _image_dataset(records, options, decoder, batch_size, failures):
    chunks.append(features_fn(batch).numpy())
    kept.append(indices.numpy())
    progress.update(int(indices.shape[0]))
  if failures:
    raise failures[0]
  if not chunks and empty_dim is not None:
    return np.zeros([0, empty_dim], np.float32), np.zeros([0], np.int64), decoder.skipped
  if not chunks:
    raise errors.DataError(f"{label}: none of the {len(records)} images could be decoded")
  return (np.concatenate(chunks).astype(np.float32), np.concatenate(kept),
          decoder.skipped)


class ImageEmbedder:
  """A pretrained backbone embedding `ImageRecord`s as extraction does.

  `tool_flags=False` (export, predict): errors advise no extraction flag
  (--skip_bad_images, --allowed_modes) the tool does not have.
  """

  def __init__(self, backbone_dir: str, crop: str = "center", batch_size: int = 64,
               skip_bad: bool = False, expected_size=None,
               allowed_modes=images_lib.DEFAULT_MODES, log: Callable[[str], None] = None,
               tool_flags: bool = True):
    if crop not in image_views.CROPS:
      raise errors.ConfigError(f"--crop={crop!r}: use one of {list(image_views.CROPS)}")
    if batch_size < 1:
      raise errors.ConfigError(f"--batch_size={batch_size} must be >= 1")
    self.backbone_dir, self.crop, self.batch_size = backbone_dir, crop, batch_size
    self.model, self.description = load_backbone(backbone_dir)
    size = int(self.description["image_size"])
    self.options = images_lib.DecodeOptions(
        image_views.load_size(crop, size),
        int(self.description["channels"]), expected_size, tuple(allowed_modes), skip_bad,
        tool_flags)
    self.features_fn = image_views.feature_function(self.model, crop, size,
                                                    bool(self.description["invert"]))
    self.log = log or (lambda _: None)

  @property
  def feature_dim(self) -> int:
    return int(self.description["feature_dim"])

  def embed_records(self, records: Sequence[image_sources.ImageRecord], label: str,
                    allow_empty: bool = False):
    """(features [n_kept, D] float32, kept record indices, skipped (origin, reason)).

    No decodable record raises, unless `allow_empty` (then [0, D] features).
    """
    return extract_split(self.features_fn, list(records), self.options,
                         self.batch_size, label, self.log,
                         empty_dim=self.feature_dim if allow_empty else None)

  def __call__(self, records: Sequence[image_sources.ImageRecord], label: str) -> np.ndarray:
    """Features [n, D] of every record (a bad image raises, naming its file)."""
    return self.embed_records(records, label)[0]
