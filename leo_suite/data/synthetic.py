"""The embedded default dataset: small, synthetic, in LEO's pickle format.

`synthetic` imitates pre-computed embeddings (D = 640) where the class signal
lives in a low-dimensional subspace shared by all classes and most of each
vector's energy is class-independent nuisance. Nearest-class-mean on the raw
vectors is distracted by the nuisance; a meta-learner that learns the shared
subspace on meta-train classes (LEO's encoder, a learned projection) transfers
it to unseen classes. Train / val / test classes are disjoint; classes hold
between `min_images` and `max_images` images (unequal, like tieredImageNet).
Generation is deterministic in `seed`.
"""

import json
import os

import numpy as np

from leo_suite import fileio
from leo_suite.data import embedding_keys
from leo_suite.data import embeddings

DATASET_NAME = "synthetic"
CROP = "center"
DEFAULTS = dict(dim=640, signal_dim=24, nuisance_dim=16, classes=(64, 16, 20),
                min_images=56, max_images=64, within_class_scale=0.8,
                nuisance_scale=2.0, isotropic_scale=0.5, seed=2019)


def generate(dim=640, signal_dim=24, nuisance_dim=16, classes=(64, 16, 20),
             min_images=56, max_images=64, within_class_scale=0.8,
             nuisance_scale=2.0, isotropic_scale=0.5, seed=2019):
  """Returns {split: (keys, embeddings)} for train/val/test.

  x = U_s (mu_c + e_w) + U_n e_n + e_iso + offset, with U_s (signal) and U_n
  (nuisance) orthonormal bases shared by all splits, mu_c ~ N(0, I/s) per
  class, e_w the within-class spread, e_n a strong low-rank nuisance and
  e_iso weak isotropic noise.
  """
  rng = np.random.default_rng(seed)
  basis, _ = np.linalg.qr(rng.standard_normal((dim, signal_dim + nuisance_dim)))
  signal, nuisance = basis[:, :signal_dim], basis[:, signal_dim:]
  offset = rng.standard_normal(dim) * (0.5 / np.sqrt(dim))
  out = {}
  for split, num_classes in zip(embeddings.SPLITS, classes):
    keys, rows = [], []
    for c in range(num_classes):
      class_name = f"syn{split}{c:03d}"
      center = rng.standard_normal(signal_dim) / np.sqrt(signal_dim)
      count = int(rng.integers(min_images, max_images + 1))
      within = rng.standard_normal((count, signal_dim)) * (
          within_class_scale / np.sqrt(signal_dim))
      strong = rng.standard_normal((count, nuisance_dim)) * (
          nuisance_scale / np.sqrt(nuisance_dim))
      weak = rng.standard_normal((count, dim)) * (isotropic_scale / np.sqrt(dim))
      rows.append((center + within) @ signal.T + strong @ nuisance.T + weak + offset)
      keys.extend(embedding_keys.make_key(class_name, i, prefix="synthetic")
                  for i in range(count))
    out[split] = (keys, np.concatenate(rows).astype(np.float32))
  return out


def ensure(data_path, **overrides):
  """Writes the synthetic dataset under data_path unless already there.

  Returns the dataset directory. A manifest records the generator settings;
  files are written atomically, the manifest last, so an interrupted write is
  redone on the next call.
  """
  params = dict(DEFAULTS, **overrides)
  directory = os.path.join(data_path, DATASET_NAME, CROP)
  manifest_path = os.path.join(directory, "manifest.json")
  if os.path.exists(manifest_path):
    with open(manifest_path) as handle:
      if json.load(handle).get("params") == json.loads(json.dumps(params)):
        return directory
  for split, (keys, matrix) in generate(**params).items():
    embeddings.write_split(
        os.path.join(directory, split + embeddings.PICKLE_SUFFIX), keys, matrix)
  fileio.atomic_write_text(manifest_path, json.dumps(
      {"dataset": DATASET_NAME, "synthetic": True, "params": params}, indent=1))
  return directory
