"""The linear metric the meta-train classes teach, scored on meta-val (issue 31).

  python experiments/omniglot_metric_bound.py --work_dir=runs/o31_views4

Reads a pipeline work dir's embeddings (<work_dir>/embeddings/omniglot_small/
<crop>), fits within-class whitening on the meta-train split's unit rows,

    T = (S_w / mean eigenvalue of S_w + lambda I)^(-1/2),   S_w = within-class scatter,

and prints cosine nearest class mean of the meta-val rows mapped by T, for each
--lambdas value, beside the identity (plain NCM), on the fixed validation
episodes (--num_episodes per setting, seed 0, 15 queries per class);
--fit_split=val fits it on meta-val itself, an oracle's upper bound;
--fit_alphabet / --eval_alphabet restrict fitting and scoring to one alphabet
(across meta-val's two: does one alphabet's map carry to another?), and
--fit_on_views fits on the spread of each image's views instead (label-free;
with --eval_split=train on a work dir extracted with views). It is the
closed-form answer to "which linear map of the features separates these
classes' drawings best": what a learner that meta-trains a linear map in
front of a nearest-mean or cosine readout (ProtoNet, Matching) moves towards.
If no lambda beats plain NCM on meta-val by more than the intervals, the
meta-train classes hold no linear metric for the learners to find. Meta-test
is not read.
"""
import dataclasses
import json
import os

from leo_suite import console

console.import_tensorflow()

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from leo_suite import errors  # pylint: disable=wrong-import-position
from leo_suite import safeio  # pylint: disable=wrong-import-position
from leo_suite.data import embeddings as embeddings_lib  # pylint: disable=wrong-import-position
from leo_suite.data import views as views_lib  # pylint: disable=wrong-import-position
from leo_suite.pipelines import omniglot  # pylint: disable=wrong-import-position
from leo_suite.pretrain import pipeline  # pylint: disable=wrong-import-position

flags.DEFINE_string("work_dir", None, "An Omniglot pipeline work dir (its embeddings/).")
flags.DEFINE_string("crop", "warps", "The embeddings' crop folder.")
flags.DEFINE_list("lambdas", ["3", "1", "0.3", "0.1", "0.03"], "Ridge added to the "
                  "normalised within-class scatter before its inverse square root.")
flags.DEFINE_enum("fit_split", "train", ["train", "val"], "Split the scatter is fitted on; "
                  "'val' is an oracle (the map sees the episodes' own classes): an upper "
                  "bound on what any such map could add, not a score.")
flags.DEFINE_string("fit_alphabet", "", "Fit on this alphabet's characters of --fit_split only.")
flags.DEFINE_string("eval_alphabet", "", "Score on this alphabet's meta-val characters only.")
flags.DEFINE_enum("eval_split", "val", ["val", "train"], "Split scored (train: the held-out "
                  "meta-train characters, for --fit_on_views).")
flags.DEFINE_boolean("fit_on_views", False, "Fit on the spread of each image's views "
                     "(<fit_split>_views.npz, label-free) instead of each class's rows.")
flags.DEFINE_list("settings", ["5w1s", "20w1s"], "Episode settings <ways>w<shots>s.")
flags.DEFINE_integer("num_episodes", 1000, "Validation episodes per setting.", lower_bound=1)
FLAGS = flags.FLAGS


def unit(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def whitening(groups, ridge: float) -> np.ndarray:
  """(S / mean eigenvalue + ridge I)^(-1/2), S the scatter of unit rows about
  their group's mean (`groups`: arrays [rows, D], a class's rows or an image's views)."""
  centred = np.concatenate([g - g.mean(axis=0) for g in
                            (unit(np.asarray(g, np.float64)) for g in groups)])
  scatter = centred.T @ centred / len(centred)
  values, vectors = np.linalg.eigh(scatter / np.mean(np.linalg.eigvalsh(scatter)))
  return vectors @ np.diag((np.maximum(values, 0.0) + ridge) ** -0.5) @ vectors.T


def of_alphabet(split, alphabet: str, manifest: dict):
  """The split restricted to one alphabet's characters (all of them for '')."""
  if not alphabet:
    return split
  keep = [c for c, token in enumerate(split.class_names)
          if manifest["class_names"].get(token, "").split("/")[0] == alphabet]
  if not keep:
    raise errors.ConfigError(f"no character of alphabet {alphabet!r} in this split")
  rows = [split.embeddings[split.class_start[c]:split.class_start[c] + split.class_count[c]]
          for c in keep]
  return embeddings_lib.split_from_labels(np.concatenate(rows), np.repeat(
      np.arange(len(keep)), split.class_count[keep]), [split.class_names[c] for c in keep])


def main(argv):
  if len(argv) > 1:
    raise errors.ConfigError(f"unexpected arguments {argv[1:]}")
  if not FLAGS.work_dir:
    raise errors.ConfigError("--work_dir is required (an Omniglot pipeline work dir)")
  settings = omniglot.parse_settings(FLAGS.settings)
  data_path = os.path.join(FLAGS.work_dir, "embeddings")
  folder = os.path.join(data_path, "omniglot_small", FLAGS.crop)
  with safeio.open_regular(os.path.join(folder, embeddings_lib.MANIFEST)) as handle:
    manifest = json.load(handle)
  fit, scored = (embeddings_lib.load_dataset_split(data_path, "omniglot_small", FLAGS.crop, name)
                 for name in (FLAGS.fit_split, FLAGS.eval_split))
  if FLAGS.fit_on_views:
    groups = views_lib.load_views(os.path.join(folder, FLAGS.fit_split + views_lib.VIEWS_SUFFIX),
                                  fit, 1)[0]
  else:
    fit = of_alphabet(fit, FLAGS.fit_alphabet, manifest)
    groups = [fit.embeddings[s:s + c] for s, c in zip(fit.class_start, fit.class_count)]
  val = of_alphabet(scored, FLAGS.eval_alphabet, manifest)
  maps = [("identity (plain NCM)", None)] + [(f"lambda {r}", float(r)) for r in FLAGS.lambdas]
  for label, ridge in maps:
    mapped = val if ridge is None else dataclasses.replace(
        val, embeddings=(unit(val.embeddings) @ whitening(groups, ridge)).astype(np.float32))
    rows = pipeline.evaluate_baselines(mapped, label, settings, FLAGS.num_episodes,
                                       methods=("ncm_cosine",))
    print(f"{label:<22} " + "  ".join(
        f"{r['setting']} {r['accuracy']:.2f} ± {r['ci95']:.2f}" for r in rows), flush=True)


if __name__ == "__main__":
  console.run(main)
