"""The linear metric the meta-train classes teach, scored on meta-val (issue 31).

  python experiments/omniglot_metric_bound.py --work_dir=runs/o31_views4

Reads a pipeline work dir's embeddings (<work_dir>/embeddings/omniglot_small/
<crop>), fits within-class whitening on the meta-train split's unit rows,

    T = (S_w / mean eigenvalue of S_w + lambda I)^(-1/2),   S_w = within-class scatter,

and prints cosine nearest class mean of the meta-val rows mapped by T, for each
--lambdas value, beside the identity (plain NCM), on the fixed validation
episodes (--num_episodes per setting, seed 0, 15 queries per class);
--fit_split=val fits it on meta-val itself, an oracle's upper bound. It is the
closed-form answer to "which linear map of the features separates these
classes' drawings best": what a learner that meta-trains a linear map in
front of a nearest-mean or cosine readout (ProtoNet, Matching) moves towards.
If no lambda beats plain NCM on meta-val by more than the intervals, the
meta-train classes hold no linear metric for the learners to find. Meta-test
is not read.
"""
import dataclasses
import os

from leo_suite import console

console.import_tensorflow()

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from leo_suite import errors  # pylint: disable=wrong-import-position
from leo_suite.data import embeddings as embeddings_lib  # pylint: disable=wrong-import-position
from leo_suite.pipelines import omniglot  # pylint: disable=wrong-import-position
from leo_suite.pretrain import pipeline  # pylint: disable=wrong-import-position

flags.DEFINE_string("work_dir", None, "An Omniglot pipeline work dir (its embeddings/).")
flags.DEFINE_string("crop", "warps", "The embeddings' crop folder.")
flags.DEFINE_list("lambdas", ["3", "1", "0.3", "0.1", "0.03"], "Ridge added to the "
                  "normalised within-class scatter before its inverse square root.")
flags.DEFINE_enum("fit_split", "train", ["train", "val"], "Split the scatter is fitted on; "
                  "'val' is an oracle (the map sees the episodes' own classes): an upper "
                  "bound on what any such map could add, not a score.")
flags.DEFINE_list("settings", ["5w1s", "20w1s"], "Episode settings <ways>w<shots>s.")
flags.DEFINE_integer("num_episodes", 1000, "Validation episodes per setting.", lower_bound=1)
FLAGS = flags.FLAGS


def unit(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def whitening(split: embeddings_lib.EmbeddingSplit, ridge: float) -> np.ndarray:
  """(S_w / mean eigenvalue + ridge I)^(-1/2) of the split's unit rows."""
  rows = unit(split.embeddings.astype(np.float64))
  centred = np.concatenate([rows[s:s + c] - rows[s:s + c].mean(axis=0)
                            for s, c in zip(split.class_start, split.class_count)])
  scatter = centred.T @ centred / len(centred)
  values, vectors = np.linalg.eigh(scatter / np.mean(np.linalg.eigvalsh(scatter)))
  return vectors @ np.diag((np.maximum(values, 0.0) + ridge) ** -0.5) @ vectors.T


def main(argv):
  if len(argv) > 1:
    raise errors.ConfigError(f"unexpected arguments {argv[1:]}")
  if not FLAGS.work_dir:
    raise errors.ConfigError("--work_dir is required (an Omniglot pipeline work dir)")
  settings = omniglot.parse_settings(FLAGS.settings)
  data_path = os.path.join(FLAGS.work_dir, "embeddings")
  fit, val = (embeddings_lib.load_dataset_split(data_path, "omniglot_small", FLAGS.crop, name)
              for name in (FLAGS.fit_split, "val"))
  maps = [("identity (plain NCM)", None)] + [(f"lambda {r}", float(r)) for r in FLAGS.lambdas]
  for label, ridge in maps:
    mapped = val if ridge is None else dataclasses.replace(
        val, embeddings=(unit(val.embeddings) @ whitening(fit, ridge)).astype(np.float32))
    rows = pipeline.evaluate_baselines(mapped, label, settings, FLAGS.num_episodes,
                                       methods=("ncm_cosine",))
    print(f"{label:<22} " + "  ".join(
        f"{r['setting']} {r['accuracy']:.2f} ± {r['ci95']:.2f}" for r in rows), flush=True)


if __name__ == "__main__":
  console.run(main)
