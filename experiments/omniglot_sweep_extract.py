"""Extract a sweep backbone's Omniglot-small embeddings and score val NCM (issue 12).

  python experiments/omniglot_sweep_extract.py runs/sweep/<name> [val_tasks] [crop] [--post]

Writes runs/sweep/<name>/embeddings/omniglot_small/<crop>/*.pkl (crop: center,
the default, or any of leo_suite.pretrain.extract.CROPS) and prints the
cosine-NCM and logistic-regression accuracy on the meta-val split for 5w1s /
5w5s / 20w1s on the same fixed episodes runner.py validates on (--eval_seed=0,
15 queries). `--post` also scores feature post-processing on the same
episodes (NCM only): CL2N (subtract the meta-train mean, then the sampler's
L2 normalisation; SimpleShot), CL2N of L2-normalised features, and the power
transform x^0.5 before centring (PT-MAP's, centred inductively on meta-train).
"""
import dataclasses
import json
import os

from leo_suite import console

console.import_tensorflow()

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from leo_suite import errors  # pylint: disable=wrong-import-position
from leo_suite.data import embeddings as embeddings_lib  # pylint: disable=wrong-import-position
from leo_suite.pretrain import extract  # pylint: disable=wrong-import-position
from leo_suite.pretrain import pipeline  # pylint: disable=wrong-import-position

flags.DEFINE_boolean("post", False, "Also score feature post-processing (NCM only).")
FLAGS = flags.FLAGS


def main(argv):
  args = argv[1:]
  if not 1 <= len(args) <= 3:
    raise errors.ConfigError("usage: omniglot_sweep_extract.py RUN [VAL_TASKS] [CROP] [--post]")
  run = args[0]
  tasks = int(args[1]) if len(args) > 1 else 300
  crop = args[2] if len(args) > 2 else "center"
  archives, by_class, split_classes, origin = pipeline.omniglot_small()
  data_path = os.path.join(run, "embeddings")
  if not os.path.exists(os.path.join(data_path, "omniglot_small", crop, "manifest.json")):
    extract.extract_embeddings(os.path.join(run, "backbone"), by_class, split_classes,
                               data_path, "omniglot_small", crop, "pkl", 256,
                               expected_size=(105, 105), allowed_modes=("1", "L"),
                               sources=archives, split_origin=origin, log=lambda s: None)
  val = embeddings_lib.load_dataset_split(data_path, "omniglot_small", crop, "val")
  rows = pipeline.evaluate_baselines(val, "val", num_episodes=tasks, seed=0)
  out = {r["method"] + " " + r["setting"]: round(r["accuracy"], 2) for r in rows}
  if FLAGS.post:
    train = embeddings_lib.load_dataset_split(data_path, "omniglot_small", crop,
                                              "train").embeddings
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    root = lambda x: np.sqrt(np.maximum(x, 0.0) + 1e-6)
    variants = {"cl2n": val.embeddings - train.mean(0),
                "l2n_cl2n": unit(val.embeddings) - unit(train).mean(0),
                "pt0.5_cl2n": root(val.embeddings) - root(train).mean(0)}
    for name, rows_ in variants.items():
      split = dataclasses.replace(val, embeddings=rows_.astype(np.float32))
      for r in pipeline.evaluate_baselines(split, name, num_episodes=tasks, seed=0,
                                           methods=("ncm_cosine",)):
        out[r["method"] + " " + r["setting"]] = round(r["accuracy"], 2)
  print(json.dumps({"run": run, "crop": crop, "val_tasks": tasks, **out}))


if __name__ == "__main__":
  console.run(main)
