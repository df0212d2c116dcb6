"""The steps the pretraining scripts share: decode, pretrain, extract, evaluate.

`scripts/pretrain.py`, `scripts/extract_embeddings.py` and
leo_suite/pipelines/omniglot.py are thin wrappers over these functions,
and the real-data integration test calls them directly.
"""

import json
import os
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

from leo_suite import errors
from leo_suite import fileio
from leo_suite.data import embeddings as embeddings_lib
from leo_suite.data import image_views
from leo_suite.data import images as images_lib
from leo_suite.pretrain import baselines
from leo_suite.pretrain import class_splits
from leo_suite.training import compare

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SETTINGS = ((5, 1), (5, 5), (20, 1))  # (num_ways, num_shots)


def decode_classes(by_class, classes: Sequence[str], options: images_lib.DecodeOptions):
  """uint8 images [n, S, S, C], int32 labels (index into `classes`), skipped list."""
  records = [r for c in classes for r in by_class[c]]
  labels_all = np.asarray([i for i, c in enumerate(classes) for _ in by_class[c]], np.int32)
  images, kept, skipped = images_lib.load_arrays(records, options)
  labels = labels_all[kept]
  missing = sorted(set(range(len(classes))) - set(labels.tolist()))
  if missing:
    raise errors.DataError(
        f"class {classes[missing[0]]!r} has no readable images left after skipping "
        f"{len(skipped)} bad image(s)")
  return images, labels, skipped


OMNIGLOT_SMALL_ARCHIVES = ("images_background_small1.zip", "images_background_small2.zip")


def omniglot_small(omniglot_dir: Optional[str] = None):
  """(archive paths, records by class, {split: classes}, split origin) of the
  two Omniglot background-small archives under the `omniglot_small` split."""
  omniglot_dir = omniglot_dir or class_splits.default_omniglot_dir()
  archives = [os.path.join(omniglot_dir, name) for name in OMNIGLOT_SMALL_ARCHIVES]
  by_class, split_classes, origin = class_splits.load_labelled_splits(
      archives, "omniglot_small", omniglot_dir)
  return archives, by_class, split_classes, origin


def feature_split(backbone, x, labels: np.ndarray) -> embeddings_lib.EmbeddingSplit:
  """`backbone`'s inference-mode features of images x (batches of 512) as a
  split labelled `labels`."""
  features = np.concatenate([backbone(x[i:i + 512], training=False).numpy()
                             for i in range(0, len(labels), 512)])
  return embeddings_lib.split_from_labels(features, labels)


def ncm_scores(backbone, x, labels: np.ndarray, num_episodes: int, seed: int = 0):
  """Cosine nearest-class-mean accuracy {'5w1s': ..., ...} (2 decimals) of
  `backbone`'s features of images x on fixed episodes of every setting."""
  split = feature_split(backbone, x, labels)
  return {f"{w}w{s}s": round(baselines.evaluate("ncm_cosine", split, w, s, 15,
                                                 num_episodes, seed)["accuracy"], 2)
          for w, s in SETTINGS}


def val_ncm_callback(images: np.ndarray, labels: np.ndarray, invert: bool,
                     num_episodes: int = 200, seed: int = 0):
  """Epoch hook: nearest-class-mean 5-way 1-shot accuracy on meta-val images."""
  x = image_views.preprocess(images, invert)

  def callback(epoch, backbone):
    del epoch
    result = baselines.evaluate("ncm_cosine", feature_split(backbone, x, labels), 5, 1, 15,
                                num_episodes, seed)
    return {"val_ncm_5w1s": result["accuracy"]}
  return callback


def evaluate_baselines(split: embeddings_lib.EmbeddingSplit, label: str,
                       settings=SETTINGS, num_episodes: int = 1000, num_queries: int = 15,
                       seed: int = 0, methods=("ncm_cosine", "logistic_regression")):
  """Rows {method, setting, accuracy, ci95, num_tasks} on fixed seeded episodes."""
  rows = []
  for method in methods:
    for ways, shots in settings:
      result = baselines.evaluate(method, split, ways, shots, num_queries, num_episodes, seed)
      rows.append({"method": f"{method} ({label})", "setting": f"{ways}w{shots}s", **result})
  return rows


def run_learner(model: str, data_path: str, dataset_name: str, ways: int, shots: int,
                run_dir: str, num_steps: int, num_test_tasks: int, num_queries: int = 15,
                seed: int = 0, extra_flags: Sequence[str] = (), crop: str = "center",
                log: Callable[[str], None] = print, threads: Optional[int] = None):
  """Trains then evaluates `model` with runner.py on the baselines' episodes.

  `--eval_seed=seed --eval_num_query=num_queries` makes the runner score the
  exact tasks `evaluate_baselines(..., seed=seed)` scored.
  """
  checkpoint = os.path.join(run_dir, f"{model}_{ways}w{shots}s")
  flags = [f"--data_path={data_path}", f"--dataset_name={dataset_name}",
           f"--embedding_crop={crop}", f"--num_classes={ways}",
           f"--num_tr_examples_per_class={shots}", f"--num_val_examples_per_class={num_queries}",
           f"--eval_num_query={num_queries}", f"--eval_seed={seed}",
           f"--num_steps_limit={num_steps}", f"--checkpoint_steps={max(1, num_steps // 2)}",
           f"--log_steps={max(1, num_steps // 10)}", "--num_val_batches=1",
           f"--metavalid_batch_size={min(200, num_test_tasks)}",
           f"--metatest_batch_size={min(200, num_test_tasks)}",
           f"--num_test_tasks={num_test_tasks}", "--baselines=", *extra_flags]
  return compare.run_learner(model, checkpoint, flags, log=log, threads=threads)


def write_json(path, payload):
  fileio.atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str))


def pixel_split(by_class, classes, image_size, invert) -> embeddings_lib.EmbeddingSplit:
  """Raw pixels (flattened, preprocessed) as an EmbeddingSplit, for reference rows."""
  images, labels, _ = decode_classes(by_class, classes,
                                     images_lib.DecodeOptions(image_size, 1))
  features = tf.reshape(image_views.preprocess(images, invert), [len(labels), -1]).numpy()
  return embeddings_lib.split_from_labels(features, labels, list(classes), {"pixels": ""})
