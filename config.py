"""Command-line flags: the release's names and defaults, plus the suite's.

Groups: data, episodes, outer loop / checkpoints (the release's flags, same
names and defaults), runner extras, and one group per learner generated from
that learner's `Config` dataclass (`--<prefix><field>`, help in the paper's
notation). The library never reads flags: `run_config()` turns them into
plain config objects once.
"""

import dataclasses
import os

from absl import flags

from leo_suite import errors
from leo_suite.models import registry

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA_PATH = os.path.join(REPO_ROOT, "embeddings")

# -- data (release names) -----------------------------------------------------
flags.DEFINE_string("data_path", DEFAULT_DATA_PATH,
                    "Root of the embeddings: <data_path>/<dataset_name>/<embedding_crop>/"
                    "<split>_embeddings.pkl (or .npz).")
flags.DEFINE_string("dataset_name", "miniImageNet",
                    "miniImageNet, tieredImageNet (LEO's release), 'synthetic' (the embedded "
                    "default, generated on first use) or any dataset directory under data_path.")
flags.DEFINE_enum("embedding_crop", "center", ["center", "multiview"],
                  "Which embeddings: center crop or multiview (miniImageNet only in the release).")
flags.DEFINE_boolean("train_on_val", False, "Meta-train on train + val classes (as the paper's final runs).")

# -- episodes (release names) ---------------------------------------------------
flags.DEFINE_integer("num_classes", 5, "N: classes per task (N-way).")
flags.DEFINE_integer("num_tr_examples_per_class", 1, "K: support examples per class (K-shot).")
flags.DEFINE_integer("num_val_examples_per_class", 15, "V: query examples per class in meta-training.")
flags.DEFINE_integer("metatrain_batch_size", 12, "Tasks per meta-training step.")
flags.DEFINE_integer("metavalid_batch_size", 200, "Tasks per meta-validation batch.")
flags.DEFINE_integer("metatest_batch_size", 200, "Tasks per meta-test batch.")

# -- outer loop and checkpoints (release names) ---------------------------------
flags.DEFINE_integer("num_steps_limit", int(1e5), "Meta-training steps.")
flags.DEFINE_float("outer_lr", 1e-4, "Adam learning rate of the outer loop.")
flags.DEFINE_float("gradient_threshold", 0.1, "Clip each meta-gradient element to +-this (0 = off).")
flags.DEFINE_float("gradient_norm_threshold", 0.1, "Then clip each meta-gradient tensor to this norm (0 = off).")
flags.DEFINE_string("checkpoint_path", "/tmp/leo", "Run directory: checkpoints, best/, config.json, results.")
flags.DEFINE_integer("checkpoint_steps", 1000, "Validate and checkpoint every this many steps.")
flags.DEFINE_boolean("evaluation_mode", False, "Evaluate the best (else latest) checkpoint on the test split.")

# -- runner extras ------------------------------------------------------------------
flags.DEFINE_enum("model", "leo", sorted(registry.LEARNERS), "Which meta-learner.")
flags.DEFINE_string("preset", "", "Named hyper-parameters, overridden by explicit flags: " +
                    ", ".join(["demo", "mini_1shot", "mini_5shot", "tiered_1shot", "tiered_5shot"]) + ".")
flags.DEFINE_integer("seed", 0, "Seed of initialisation, training episodes, dropout and sampling.")
flags.DEFINE_integer("eval_seed", 1, "Seed of the fixed validation/test episode sets.")
flags.DEFINE_integer("num_val_batches", 10, "Validation = mean over this many metavalid batches.")
flags.DEFINE_integer("num_test_tasks", 10000, "Test tasks in evaluation mode.")
flags.DEFINE_integer("eval_num_query", 0,
                     "V at validation/test; 0 = all remaining images of each class (the release: "
                     "images_per_class - K, using the smallest class of the split).")
flags.DEFINE_enum("dtype", "float32", ["float32", "float64"], "Floating-point type of the model.")
flags.DEFINE_boolean("deterministic", False,
                     "Enable TF op determinism: same seed, same result, bit for bit (slower).")
flags.DEFINE_boolean("jit_compile", False, "Compile the meta-training step with XLA.")
flags.DEFINE_enum("distribution_strategy", "default", ["default", "mirrored", "multi_worker"],
                  "default: one device; mirrored: all local GPUs (or --devices, or "
                  "--num_cpu_devices logical CPUs); multi_worker: MultiWorkerMirroredStrategy "
                  "from TF_CONFIG. The meta-batch is split over replicas (must divide evenly).")
flags.DEFINE_string("devices", "", "With --distribution_strategy=mirrored: comma list of "
                    "devices, e.g. /gpu:0,/gpu:1 or /cpu:0,/cpu:1 ('' = all local GPUs, else CPUs).")
flags.DEFINE_integer("num_cpu_devices", 0, "Split the CPU into this many logical devices "
                     "/cpu:0.. (0 = leave as is); for testing mirrored on a machine without GPUs.")
flags.DEFINE_string("baselines", "ncm",
                    "Comma list of non-learned baselines scored on the same test episodes in "
                    "evaluation mode: ncm (nearest class mean, cosine), logreg (per-episode "
                    "logistic regression); empty for none.")
flags.DEFINE_integer("log_steps", 100, "Log and write summaries every this many steps.")

# The release's tuned hyper-parameters (LEO README), and the demo's.
PRESETS = {
    "demo": dict(dataset_name="synthetic", num_steps_limit=1500, checkpoint_steps=500,
                 outer_lr=1e-3, num_val_batches=2, metavalid_batch_size=100,
                 num_test_tasks=1000, metatest_batch_size=100, log_steps=100),
    "mini_1shot": dict(dataset_name="miniImageNet", num_tr_examples_per_class=1,
                       outer_lr=2.739e-4, l2_penalty_weight=3.623e-10,
                       orthogonality_penalty_weight=0.188103, dropout_rate=0.307651,
                       kl_weight=0.756143, encoder_penalty_weight=5.757e-6),
    "mini_5shot": dict(dataset_name="miniImageNet", num_tr_examples_per_class=5,
                       outer_lr=4.102e-4, l2_penalty_weight=8.540e-9,
                       orthogonality_penalty_weight=1.523e-3, dropout_rate=0.300299,
                       kl_weight=0.466387, encoder_penalty_weight=2.661e-7),
    "tiered_1shot": dict(dataset_name="tieredImageNet", num_tr_examples_per_class=1,
                         outer_lr=8.659e-4, l2_penalty_weight=4.148e-10,
                         orthogonality_penalty_weight=5.451e-3, dropout_rate=0.475126,
                         kl_weight=2.034e-3, encoder_penalty_weight=8.302e-5),
    "tiered_5shot": dict(dataset_name="tieredImageNet", num_tr_examples_per_class=5,
                         outer_lr=6.110e-4, l2_penalty_weight=1.690e-10,
                         orthogonality_penalty_weight=2.481e-2, dropout_rate=0.415158,
                         kl_weight=1.622811, encoder_penalty_weight=2.672e-5),
}

_FLAG_TYPES = {int: flags.DEFINE_integer, float: flags.DEFINE_float,
               bool: flags.DEFINE_boolean, str: flags.DEFINE_string}


def _define_learner_flags():
  """One flag per learner Config field, named <FLAG_PREFIX><field>."""
  for name in registry.available():
    module = registry.learner_module(name)
    for field in dataclasses.fields(module.Config):
      define = _FLAG_TYPES[type(field.default)]
      help_text = f"[{name}] " + field.metadata.get("help", field.name)
      define(module.FLAG_PREFIX + field.name, field.default, help_text)


_define_learner_flags()
FLAGS = flags.FLAGS


def apply_preset():
  """Sets the preset's values on flags the user did not give explicitly."""
  if not FLAGS.preset:
    return
  if FLAGS.preset not in PRESETS:
    raise errors.ConfigError(f"--preset={FLAGS.preset!r} is unknown; choose one of {sorted(PRESETS)}")
  for key, value in PRESETS[FLAGS.preset].items():
    if key in FLAGS and not FLAGS[key].present:
      FLAGS[key].value = value


def learner_config(model=None):
  module = registry.learner_module(model or FLAGS.model)
  values = {f.name: FLAGS[module.FLAG_PREFIX + f.name].value
            for f in dataclasses.fields(module.Config)}
  return module.Config(**values)


def flag_values():
  """Every flag this module defines (release, runner and learner flags)."""
  return {name: FLAGS[name].value for name in sorted(FLAGS)
          if FLAGS.find_module_defining_flag(name) == _MODULE_NAME}


_MODULE_NAME = FLAGS.find_module_defining_flag("data_path")
