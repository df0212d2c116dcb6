"""Omniglot-small end to end: pretrain a Conv-4, extract, baselines, learners, table.

  python scripts/omniglot_pipeline.py --work_dir=runs/omniglot_small

Pretrains a Conv-4 on the meta-train alphabets (30 epochs, affine augmentation),
extracts embeddings of all three splits (warps crop), scores nearest class
mean and logistic regression on meta-test (Latin) and trains every learner
with its preset (leo_suite/pretrain/omniglot_presets.py) through runner.py;
writes <work_dir>/results.md and results.json. The stages and the recipe's
choices: leo_suite/pipelines/omniglot.py. Rerunning after a kill resumes.
"""

import dataclasses

from leo_suite import console

console.import_tensorflow()   # no TensorFlow C++ start-up lines (--verbosity=1 shows them)

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from leo_suite import errors  # pylint: disable=wrong-import-position
from leo_suite.data import image_views  # pylint: disable=wrong-import-position
from leo_suite.models import backbones  # pylint: disable=wrong-import-position
from leo_suite.pipelines import omniglot  # pylint: disable=wrong-import-position

_DEFAULTS = omniglot.Options()
flags.DEFINE_string("omniglot_dir", _DEFAULTS.omniglot_dir, "Folder with the two Omniglot "
                    "archives and omniglot_small_split.json (default $LEO_SUITE_OMNIGLOT_DIR "
                    "or ../shared/data/omniglot).")
flags.DEFINE_list("archives", list(_DEFAULTS.archives), "Omniglot image archives (zip) or "
                  "folders (<alphabet>/<character>/<drawing>.png), relative to --omniglot_dir "
                  "unless absolute; a character in two of them counts once.")
flags.DEFINE_string("split", _DEFAULTS.split, "Alphabets (or characters) of each split: a "
                    "named protocol (omniglot_small: omniglot_small_split.json in "
                    "--omniglot_dir) or a JSON file {\"train\": [...], \"val\": [...], "
                    "\"test\": [...]}.")
flags.DEFINE_string("work_dir", _DEFAULTS.work_dir, "Everything the pipeline writes.")
flags.DEFINE_enum("backbone", _DEFAULTS.backbone, list(backbones.BACKBONES), "Pretrained "
                  "backbone (leo_suite/models/backbones.py); chosen on the meta-val "
                  "alphabets (docs/results.md, Omniglot-small).")
flags.DEFINE_integer("epochs", _DEFAULTS.epochs, "Pretraining epochs (each: 4 x 3,540 "
                     "images); chosen on the meta-val alphabets (docs/results.md, Omniglot-small).")
flags.DEFINE_string("augment", _DEFAULTS.augment, "Pretraining augmentation: none, shift "
                    "(random translation), shift_flip or affine (Koch et al. 2015 affine "
                    "warp).")
flags.DEFINE_integer("max_shift", _DEFAULTS.max_shift, "Translation range of the "
                     "augmentation (pixels at 28x28).")
flags.DEFINE_string("head", _DEFAULTS.head, "Pretraining classifier head: linear or cosine.")
flags.DEFINE_enum("crop", _DEFAULTS.crop, list(image_views.CROPS), "Extraction crop of every "
                  "split (leo_suite/pretrain/extract.py); the learners train on it and "
                  "exports of their runs embed images the same way.")
flags.DEFINE_integer("distill_generations", _DEFAULTS.distill_generations, "Born-again "
                     "students after the first network, each distilled from the previous "
                     "one (0: none); the last one's backbone is extracted.")
flags.DEFINE_float("distill_alpha", _DEFAULTS.distill_alpha, "Weight of the distillation "
                   "term (students).")
flags.DEFINE_float("distill_temperature", _DEFAULTS.distill_temperature, "Distillation "
                   "temperature (students).")
flags.DEFINE_integer("batch_size", _DEFAULTS.batch_size, "Pretraining batch size.")
flags.DEFINE_float("learning_rate", _DEFAULTS.learning_rate, "Pretraining peak SGD "
                   "learning rate.")
flags.DEFINE_integer("seed", _DEFAULTS.seed, "Pretraining seed.")
flags.DEFINE_integer("val_episodes", _DEFAULTS.val_episodes, "Meta-val NCM 5w1s episodes "
                     "after each epoch.")
flags.DEFINE_integer("num_episodes", _DEFAULTS.num_episodes, "Fixed meta-test episodes per "
                     "setting.")
flags.DEFINE_integer("episode_seed", _DEFAULTS.episode_seed, "Seed of the fixed meta-test "
                     "episodes.")
flags.DEFINE_boolean("pixel_baseline", _DEFAULTS.pixel_baseline, "Also report NCM on raw "
                     "pixels.")
flags.DEFINE_list("learners", list(_DEFAULTS.learners),
                  "runner.py models to train and evaluate ('' for none).")
flags.DEFINE_integer("runner_steps", _DEFAULTS.runner_steps, "Meta-training steps per "
                     "learner and setting (0: each learner's preset steps, "
                     "leo_suite/pretrain/omniglot_presets.py).")
flags.DEFINE_multi_string("runner_flag", list(_DEFAULTS.runner_flag), "Extra flag passed to "
                          "every runner.py call.")
flags.DEFINE_list("settings", list(_DEFAULTS.settings), "Episode settings <ways>w<shots>s.")
flags.DEFINE_integer("parallel_learners", _DEFAULTS.parallel_learners, "runner.py trainings "
                     "run at the same time, each with max(1, cores // parallel_learners) "
                     "TensorFlow threads unless TF_NUM_INTRAOP_THREADS / "
                     "TF_NUM_INTEROP_THREADS are set.")
flags.DEFINE_float("metatrain_holdout", _DEFAULTS.metatrain_holdout, "Fraction of the "
                   "meta-train characters kept out of pretraining (drawn with --seed); the "
                   "learners meta-train on episodes of these unseen classes. 0: on the "
                   "pretraining classes.")
flags.DEFINE_boolean("metatrain_rotations", _DEFAULTS.metatrain_rotations, "Meta-train "
                     "episodes also draw their characters turned by 90, 180 and 270 degrees, "
                     "each turn a class of its own (4x the meta-train classes).")
flags.DEFINE_integer("metatrain_views", _DEFAULTS.metatrain_views, "> 0: each meta-train "
                     "image appears in an episode as the mean of this many of its views (the "
                     "warps crop's 16), drawn per episode (runner.py --metatrain_views). 0: "
                     "the averaged embedding.", lower_bound=0)
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise errors.ConfigError(f"unexpected arguments {argv[1:]}")
  options = omniglot.Options(**{f.name: FLAGS[f.name].value
                                for f in dataclasses.fields(omniglot.Options)})
  print(omniglot.run(options))


if __name__ == "__main__":
  console.run(main)
