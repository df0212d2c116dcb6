"""Score non-learned classifiers on an embeddings split, on fixed episodes.

  .venv/bin/python scripts/score_baselines.py --data_path=runs/omniglot_v4/embeddings \
      --dataset_name=omniglot_small --embedding_crop=warps --split=test --settings=5w5s,5w1s

Prints accuracy ± 95% CI on the episodes `scripts/omniglot_pipeline.py` and
`runner.py --eval_seed=SEED --eval_num_query=15` score (same seed, same
draws), for:
  ncm_cosine            cosine to the L2-normalised class mean (the pipeline's NCM)
  logistic_regression   per-episode multinomial logistic regression
  mean_dot              dot product with the class mean of the unit-norm
                        support features, the mean not normalised: what one
                        gradient step from a zero linear head scores by (the
                        initialisation MAML-style heads start from); equal to
                        ncm_cosine at 1-shot
"""

from leo_suite import console

console.import_tensorflow()   # no TensorFlow C++ start-up lines (--verbosity=1 shows them)

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from leo_suite import errors  # pylint: disable=wrong-import-position
from leo_suite.data import embeddings as embeddings_lib  # pylint: disable=wrong-import-position
from leo_suite.pretrain import baselines  # pylint: disable=wrong-import-position

flags.DEFINE_string("data_path", None, "Folder holding <dataset>/<crop>/<split>_embeddings.*")
flags.DEFINE_string("dataset_name", None, "Dataset folder name.")
flags.DEFINE_string("embedding_crop", "center", "Crop folder (as runner.py).")
flags.DEFINE_string("split", "val", "train, val or test.")
flags.DEFINE_list("settings", ["5w1s", "5w5s", "20w1s"], "Episode settings <ways>w<shots>s.")
flags.DEFINE_list("methods", ["ncm_cosine", "mean_dot"], "Classifiers to score.")
flags.DEFINE_integer("num_episodes", 1000, "Fixed episodes per setting.")
flags.DEFINE_integer("num_queries", 15, "Queries per class.")
flags.DEFINE_integer("seed", 0, "Episode seed.")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise errors.ConfigError(f"unexpected arguments {argv[1:]}")
  for name in ("data_path", "dataset_name"):
    if not getattr(FLAGS, name):
      raise errors.ConfigError(f"--{name} is required")
  unknown = [m for m in FLAGS.methods if m not in baselines.BASELINES]
  if unknown:
    raise errors.ConfigError(
        f"--methods: unknown {unknown}; choose from {sorted(baselines.BASELINES)}")
  try:
    settings = [tuple(int(v) for v in s.rstrip("s").split("w")) for s in FLAGS.settings]
  except ValueError:
    raise errors.ConfigError(f"--settings={FLAGS.settings}: use e.g. 5w1s,20w1s") from None
  split = embeddings_lib.load_dataset_split(FLAGS.data_path, FLAGS.dataset_name,
                                            FLAGS.embedding_crop, FLAGS.split)
  for ways, shots in settings:
    for method in FLAGS.methods:
      result = baselines.evaluate(method, split, ways, shots, FLAGS.num_queries,
                                  FLAGS.num_episodes, FLAGS.seed)
      print(f"{FLAGS.split} {ways}w{shots}s {method:<20} {result['accuracy']:.2f} ± "
            f"{result['ci95']:.2f}", flush=True)


if __name__ == "__main__":
  console.run(main)
